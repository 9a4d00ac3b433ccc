"""README: FAILED_OPEN_LIMIT `0` disables the limit; failures older than FAILED_OPEN_WINDOW
no longer count."""

from __future__ import annotations

import time

from frontend_fakes import OPEN, answer, make_client, payload

from luksctl.errors import WrappingTokenInvalid

BAD_TOKEN = WrappingTokenInvalid("the wrapping token is invalid, expired or already used")


def test_failed_open_limit_0_never_answers_429_and_keeps_no_counter(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, FAILED_OPEN_LIMIT=0)
    fake_vault.error = BAD_TOKEN

    assert [client.post(OPEN, json=payload()).status_code for _ in range(12)] == [403] * 12
    assert not (tmp_path / "failed-opens.sqlite").exists()


def test_failures_older_than_the_window_no_longer_count(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, FAILED_OPEN_LIMIT=2, FAILED_OPEN_WINDOW=1)
    fake_vault.error = BAD_TOKEN
    assert [client.post(OPEN, json=payload()).status_code for _ in range(2)] == [403, 403]
    answer(client.post(OPEN, json=payload()), 429)

    time.sleep(1.2)  # the window passes

    fake_vault.error = None
    assert answer(client.post(OPEN, json=payload()), 200)["volume_state"] == "mounted"
