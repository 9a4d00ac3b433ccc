"""Helpers shared by the host tests and the VM tests, one of each: waiting, ports, the OpenBao
dev server and its policies, the fake privileged bridge, the cryptsetup shim, the /proc recorder.

Importable as `support`: pytest puts tests/ on sys.path (tests/conftest.py, rootdir-relative),
on the host and in the guest alike (helpers_vm adds it for the VM scripts). Standard library,
but for the OpenBao driver (requests) and the fake bridge (luksctl's VolumeStatus).
"""
