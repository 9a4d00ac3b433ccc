"""Fakes for the front-end API tests: the dashboard's request, its answer's contract, a fake Vault step.
The scripted volume state and the fake bridge are support.bridge's."""

from __future__ import annotations

import json
import threading
import time

from luksctl.api import create_frontend_app
from luksctl.config import FrontendConfig

STATUS = "/luksctl_api/v1.0/status"
OPEN = "/luksctl_api/v1.0/open"
PASSPHRASE = "the volume passphrase"
TOKEN = "hvs.CAESIwrappingtoken"
INI = """\
[luks]
uuid = 0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10
cryptdev = xkqzbmwe
mountpoint = /export
"""


def payload(**changes) -> dict:
    body = {
        "vault_url": "https://vault.example:8200",
        "vault_token": TOKEN,
        "secret_root": "secrets",
        "secret_path": "user-sub@idp/3f1c0f7e-deployment/storage_encryption",
        "secret_key": "storage_encryption_key",
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


def answer(response, status: int) -> dict:
    """The dashboard's contract: a JSON body with volume_state; errors add a non-empty `error`."""
    body = json.loads(response.text)
    assert response.status_code == status, body
    assert response.mimetype == "application/json"
    assert isinstance(body, dict) and body.get("volume_state") in ("mounted", "unmounted", "unavailable"), body
    if status >= 400:
        assert isinstance(body.get("error"), str) and body["error"].strip(), body
    assert PASSPHRASE not in response.text and TOKEN not in response.text
    assert "Traceback" not in response.text and "<html" not in response.text.lower()
    return body


def make_client(tmp_path, ini, bridge, **settings):
    config = FrontendConfig(CRYPTDEV_INI=str(ini), LOCK_FILE=str(tmp_path / "open.lock"), **{"ALLOW_ANY_VAULT_URL": True, **settings})
    return create_frontend_app(config, bridge=bridge).test_client()


class FakeVault:
    def __init__(self):
        self.calls: list[tuple] = []
        self.error: Exception | None = None
        self.delay = 0.0
        self._lock = threading.Lock()

    def fetch_passphrase(self, url, ref, wrapping_token, settings):
        with self._lock:
            self.calls.append((url, ref, wrapping_token, settings))
        time.sleep(self.delay)
        if self.error:
            raise self.error
        return PASSPHRASE
