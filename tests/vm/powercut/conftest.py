"""Boot 2 of the power-cut pair: the persistent disk mounted, and OpenBao from its storage there
(what boot 1 wrote before the cut) in place of the session's dev server."""

from __future__ import annotations

import pytest
from helpers_vm import OUT, run
from persistent_disk import PERSIST, mount_persistent, persistent_bao


@pytest.fixture(scope="session")
def persistent():
    mount_persistent()
    yield
    run("umount", str(PERSIST))


@pytest.fixture(scope="session")
def bao(persistent):
    server = persistent_bao(OUT / "bao.log")
    server.start()
    yield server
    server.stop()
