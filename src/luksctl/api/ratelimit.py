"""Failed-open limits per client address, shared by every gunicorn worker.

SQLite in the service's runtime directory gives the workers one store with
proper locking and no extra daemon; the data is small and may be lost at reboot.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import require_private_directory
from ..errors import ConfigError, LuksctlError, TooManyFailures


class FailedOpenLimiter:
    """`limit` 0 turns it off: nothing is stored or refused."""

    def __init__(self, path: Path, limit: int, window: float):
        self.path = path
        self.limit = limit
        self.window = window
        if not limit:
            return
        require_private_directory(path.parent, os.geteuid())
        _create_private_file(path)
        try:
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS failures (client TEXT NOT NULL, at REAL NOT NULL)")
                db.execute("CREATE INDEX IF NOT EXISTS failures_client ON failures (client, at)")
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the failed-open counter {path} ({exc}); does its directory exist and belong to the service user?") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; waits for other workers' transactions."""
        db = sqlite3.connect(f"{self.path.as_uri()}?mode=rw", uri=True, timeout=10, isolation_level="IMMEDIATE")  # made by __init__
        try:
            with db:
                yield db
        finally:
            db.close()

    def admit(self, client: str) -> int:
        """Refuse a client with `limit` failures inside the window, saying when to retry;
        otherwise count this request as a failure until it proves otherwise.

        Check and record are one IMMEDIATE transaction, so concurrent requests from one
        address cannot all pass the check before any of them is recorded.
        """
        now = time.time()
        with self._connect() as db:
            db.execute("DELETE FROM failures WHERE at < ?", (now - self.window,))
            count, oldest = db.execute("SELECT COUNT(*), MIN(at) FROM failures WHERE client = ?", (client,)).fetchone()
            if count < self.limit:
                return db.execute("INSERT INTO failures (client, at) VALUES (?, ?)", (client, now)).lastrowid
        retry_after = max(1, math.ceil(oldest + self.window - now))
        raise TooManyFailures(f"{count} failed opens from {client} in the last {self.window:g} s; try again in {retry_after} s", retry_after)

    def forget(self, row: int) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM failures WHERE rowid = ?", (row,))

    @contextlib.contextmanager
    def counting_failures(self, client: str) -> Iterator[None]:
        """Refuse a client over the limit, and count the failures it causes (4xx only:
        Vault or us being down is not the caller's fault)."""
        if not self.limit:
            yield
            return
        row = self.admit(client)
        try:
            yield
        except LuksctlError as exc:
            if not 400 <= exc.http_status < 500:
                self.forget(row)
            raise
        except BaseException:
            self.forget(row)  # a crash is ours, not the caller's
            raise
        self.forget(row)


def _create_private_file(path: Path) -> None:
    """The database file, made by us (O_EXCL | O_NOFOLLOW, 0600) or already ours: sqlite opens it, never makes it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError(f"{path} is not a file of the service user; move it away") from None
