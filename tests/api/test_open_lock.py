"""README, 503: "another open still holds the lock past its wait", with the lock really held by
another process (the kernel's flock, as between gunicorn workers)."""

from __future__ import annotations

import sys
from pathlib import Path

from frontend_fakes import OPEN, answer, payload

from luksctl import locking
from luksctl.api import frontend

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # shared with the CLI's lock test
from lock_holder import lock_held_elsewhere  # noqa: E402


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
