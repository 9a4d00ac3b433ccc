"""A cross-process lock that cannot outlive its holder.

flock(2) locks belong to the open file description, so the kernel drops
them when the holder dies, even by SIGKILL: no stale lock files to clean.
Each call opens its own description, so threads of one process exclude
each other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LockTimeout, LuksctlError

POLL_INTERVAL = 0.05


@contextlib.contextmanager
def exclusive_lock(path: Path, *, timeout: float, what: str) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LuksctlError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"another {what} is still running after {timeout:g} s; try again later") from None
                time.sleep(POLL_INTERVAL)
        yield
    finally:
        os.close(fd)
