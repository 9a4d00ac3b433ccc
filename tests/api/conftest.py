"""Front-end API fixtures: the real app with a fake bridge, scripted state and a faked Vault step."""

from __future__ import annotations

import pytest

from frontend_fakes import INI, FakeBridge, FakeVault, Kernel
from luksctl import vault
from luksctl.api import create_frontend_app, frontend
from luksctl.config import FrontendConfig


@pytest.fixture
def kernel(monkeypatch) -> Kernel:
    fake = Kernel()
    monkeypatch.setattr(frontend, "volume_status", fake.volume_status)
    return fake


@pytest.fixture
def fake_vault(monkeypatch) -> FakeVault:
    fake = FakeVault()
    monkeypatch.setattr(vault, "fetch_passphrase", fake.fetch_passphrase)
    return fake


@pytest.fixture
def bridge(kernel) -> FakeBridge:
    return FakeBridge(kernel)


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "luks-cryptdev.ini"
    path.write_text(INI)
    return path


@pytest.fixture
def app(tmp_path, ini, bridge, fake_vault):
    config = FrontendConfig(CRYPTDEV_INI=str(ini), LOCK_FILE=str(tmp_path / "open.lock"))
    return create_frontend_app(config, bridge=bridge)


@pytest.fixture
def client(app):
    return app.test_client()
