"""Helpers shared by the host tests and the VM tests, one of each: waiting, ports, the OpenBao
dev server and its policies, the fake privileged bridge, the cryptsetup shim, the /proc recorder.

Importable as `support`: pytest puts tests/ on sys.path (tests/conftest.py, rootdir-relative),
on the host and in the guest alike. Standard library only, but for the OpenBao driver (requests).
"""
