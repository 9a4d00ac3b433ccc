"""FailedOpenLimiter's sqlite file: in a directory private to the service user, made by us, never
through a symlink (a planted database could carry triggers that run in every worker)."""

from __future__ import annotations

import sqlite3
import stat
import threading

import pytest

from luksctl.api.ratelimit import FailedOpenLimiter
from luksctl.errors import ConfigError, TooManyFailures


def test_the_database_is_made_private_and_counts(tmp_path):
    limiter = FailedOpenLimiter(tmp_path / "failed-opens.sqlite", 5, 300)
    limiter.admit("192.0.2.1")

    assert stat.S_IMODE((tmp_path / "failed-opens.sqlite").stat().st_mode) == 0o600


def test_a_shared_directory_is_refused(tmp_path):
    tmp_path.chmod(0o1777)

    with pytest.raises(ConfigError, match="writable by nobody else"):
        FailedOpenLimiter(tmp_path / "failed-opens.sqlite", 5, 300)


def test_a_symlink_at_the_database_is_refused_and_not_followed(tmp_path):
    planted = tmp_path / "planted.sqlite"
    (tmp_path / "failed-opens.sqlite").symlink_to(planted)

    with pytest.raises(ConfigError, match="not a file of the service user"):
        FailedOpenLimiter(tmp_path / "failed-opens.sqlite", 5, 300)
    assert not planted.exists()


def test_check_and_record_are_one_transaction_so_a_concurrent_worker_waits(tmp_path, monkeypatch):
    """Another worker admitting the same address between our count and our insert would let both
    through; inside one write transaction it waits for ours, then counts it."""
    path = tmp_path / "failed-opens.sqlite"
    ours, theirs = FailedOpenLimiter(path, 1, 300), FailedOpenLimiter(path, 1, 300)
    outcome = {}

    def admit_theirs():
        try:
            outcome["theirs"] = theirs.admit("192.0.2.1")
        except TooManyFailures as refused:
            outcome["theirs"] = refused

    class PausingAfterTheCount(sqlite3.Connection):
        def execute(self, sql, *args):
            cursor = super().execute(sql, *args)
            if sql.startswith("SELECT") and threading.current_thread() is threading.main_thread():
                other = threading.Thread(target=admit_theirs)
                other.start()
                other.join(0.5)  # done by now only if nothing made it wait
                outcome["theirs done during our count"] = not other.is_alive()
                outcome["thread"] = other
            return cursor

    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: connect(*args, **kwargs, factory=PausingAfterTheCount))

    ours.admit("192.0.2.1")
    outcome.pop("thread").join(15)

    assert outcome["theirs done during our count"] is False
    assert isinstance(outcome["theirs"], TooManyFailures)
