"""README, 503: "another open still holds the lock past its wait", with the lock really held by
another process (the kernel's flock, as between gunicorn workers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from frontend_fakes import INI, OPEN, answer, payload

from luksctl import locking
from luksctl.api import create_frontend_app, frontend, privileged
from luksctl.config import FrontendConfig

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # shared with the CLI's lock test
from lock_holder import lock_held_elsewhere, sudo_luksctl  # noqa: E402


def test_open_answers_503_while_another_process_holds_the_open_lock(tmp_path, client, fake_vault, monkeypatch):
    waits: list[float] = []

    def short_wait(path, *, timeout, what):  # the real wait is PRIVILEGED_TIMEOUT + 30 s
        waits.append(timeout)
        return locking.exclusive_lock(path, timeout=0.5, what=what)

    monkeypatch.setattr(frontend, "exclusive_lock", short_wait)
    with lock_held_elsewhere(tmp_path / "open.lock"):  # the app fixture's LOCK_FILE
        body = answer(client.post(OPEN, json=payload()), 503)

    assert body["volume_state"] == "unmounted"
    assert body["error"] == "another open is still running after 0.5 s; try again later"
    assert waits == [180 + 30]
    assert fake_vault.calls == [], "Vault was asked while the lock was held: the token would be spent"


def test_open_answers_503_while_another_luksctl_command_holds_the_cli_lock(tmp_path, fake_vault, monkeypatch):
    """The real bridge and the CLI in its own process: the CLI gives up on its lock (exit 6)
    before PRIVILEGED_TIMEOUT ends the call, so the dashboard hears 503, not a 500."""
    sudo, luksctl = sudo_luksctl(tmp_path)
    (tmp_path / "luks-cryptdev.ini").write_text(INI)
    (tmp_path / "config.json").write_text(json.dumps({"PRIVILEGED_TIMEOUT": 4}))  # the CLI reads it too
    monkeypatch.setattr(privileged, "SUDO", str(sudo))
    config = FrontendConfig(CRYPTDEV_INI=str(tmp_path / "luks-cryptdev.ini"), LOCK_FILE=str(tmp_path / "open.lock"),
                            ALLOW_ANY_VAULT_URL=True, LUKSCTL_BINARY=str(luksctl), PRIVILEGED_TIMEOUT=4)
    client = create_frontend_app(config).test_client()

    with lock_held_elsewhere(tmp_path / "luksctl.lock"):  # say, an operator's `luksctl rotate`
        body = answer(client.post(OPEN, json=payload()), 503)

    assert body == {"volume_state": "unmounted", "error": "another luksctl open or close is still running after 2 s; try again later"}
    assert len(fake_vault.calls) == 1
