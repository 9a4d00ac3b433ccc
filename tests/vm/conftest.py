"""Fixtures for the VM tests: real kernel, real OpenBao, the real service as deployed.

These tests run only inside the virtme-ng guest, as root (`make test-vm`). Starting a process
costs seconds under software emulation, so what is expensive to start lives for the session
and tests put it back the way they found it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from helpers_vm import OUT, Api, Bao, CryptsetupCounter, Dashboard, VolumeFactory, single_vm_config
from support.execlog import audit_every_new_process

sys.path.insert(0, str(Path(__file__).parent / "cluster"))
from cluster_lab import Lab, record_timing  # noqa: E402


def pytest_configure(config):
    # Our service presents a self-signed certificate, exactly as in production (see helpers_vm).
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


def pytest_collection_modifyitems(items):
    # Anywhere but the guest these tests would format loop devices on the host: refuse. Loudly,
    # not by skipping: a guest whose export broke would otherwise "pass" with nothing tested.
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(item.fspath).parents]
    if ours and (os.geteuid() != 0 or "LUKSCTL_VM_OUT" not in os.environ):
        raise pytest.UsageError(
            f"{len(ours)} VM tests collected outside the guest (euid {os.geteuid()}, LUKSCTL_VM_OUT "
            f"{'set' if 'LUKSCTL_VM_OUT' in os.environ else 'unset'}): run them with `make test-vm`")
    for item in ours:
        item.add_marker(pytest.mark.vm)


def pytest_collection_finish(session):
    # scripts/vm/check-junit.py compares this with what passed: a test that was selected but
    # skipped, or never ran, fails the VM run.
    if "LUKSCTL_VM_OUT" in os.environ:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "selected-tests.txt").write_text(f"{len(session.items)}\n")


@pytest.fixture(scope="session", autouse=True)
def recordable_processes():
    # Before any process the tests start: the exec recorder (support.execlog) sees only processes
    # forked after audit was first enabled on this boot.
    audit_every_new_process()


@pytest.fixture(scope="session")
def bao():
    """A real OpenBao dev server; stop()/start() it for the "Vault down" case."""
    server = Bao(OUT / "bao.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bao_up(bao):
    """The shared server, restarted if an earlier test left it stopped (its data is then gone)."""
    if bao.proc is None:
        bao.start()
    return bao


@pytest.fixture
def luks_volume():
    """A factory: luks_volume(passphrase) -> Volume, described in /etc/luks/luks-cryptdev.ini.

    The newest volume is the one the ini names. Everything is unmounted, closed and detached
    after the test.
    """
    factory = VolumeFactory()
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def worker_lab():
    """Three worker hosts in network namespaces, with the NFS server (cluster/cluster_lab.py), set
    up once: the cluster tests use them, and test_metrics.py's Prometheus scrapes one."""
    started = time.monotonic()
    lab = Lab(3)
    try:
        lab.setup()
    except BaseException:
        lab.teardown()
        raise
    record_timing("lab_setup_s", time.monotonic() - started)
    yield lab
    lab.teardown()


@pytest.fixture(scope="session")
def api_server():
    server = Api()
    yield server
    server.stop()


@pytest.fixture
def api(api_server, bao):
    """The front-end API running with the default config.json, plus OpenBao in VAULT_URL_ALLOWLIST.

    A test that needs another config calls api.restart(config); the next test that asks for
    `api` gets the default back. Restarts cost seconds, so only a changed config restarts.
    """
    api_server.ensure(single_vm_config(bao))
    return api_server


@pytest.fixture
def dashboard(api):
    return Dashboard(api.base_url)


@pytest.fixture
def cryptsetup_calls():
    """Counts real cryptsetup invocations made through luksctl's fixed PATH."""
    counter = CryptsetupCounter()
    counter.install()
    yield counter
    counter.remove()
