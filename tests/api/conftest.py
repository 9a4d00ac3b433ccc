"""Front-end API fixtures: the real app with a fake bridge, scripted state and a faked Vault step."""

from __future__ import annotations

import json
import logging

import pytest
from frontend_fakes import INI, PASSPHRASE, TOKEN, FakeVault
from support.bridge import FakeBridge, Kernel

from luksctl import audit, vault
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
    config = FrontendConfig(CRYPTDEV_INI=str(ini), LOCK_FILE=str(tmp_path / "open.lock"), ALLOW_ANY_VAULT_URL=True)
    return create_frontend_app(config, bridge=bridge)


@pytest.fixture
def client(app):
    return app.test_client()


DOCUMENTED_AUDIT_FIELDS = {
    "audit", "time", "client", "action", "outcome", "status", "error_class", "duration_ms", "volume", "vault_path", "nodes", "fanout", "alert"
}


@pytest.fixture
def audit_lines(app):
    """The audit lines the app writes, captured at the audit logger itself."""
    captured: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = captured.append
    audit.logger.addHandler(handler)

    def read() -> list[dict]:
        lines = [json.loads(record.getMessage()) for record in captured]
        captured.clear()
        for line in lines:
            assert set(line) <= DOCUMENTED_AUDIT_FIELDS, line
            assert PASSPHRASE not in json.dumps(line) and TOKEN not in json.dumps(line)
        return lines

    yield read
    audit.logger.removeHandler(handler)
