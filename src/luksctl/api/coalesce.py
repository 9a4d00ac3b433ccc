"""One call at a time for every thread and gunicorn worker; those who waited share its result.

A cluster fan-out (or a worker's remount) costs every node a `mount -a` or a
status answer, and any caller can ask for one. So: a flock makes concurrent
requests wait for the one in progress, and a small result file next to the
lock hands its result to all of them; a result younger than `min_interval`
is answered again without calling anyone. CLOCK_MONOTONIC is one clock for
every process of the machine, so the times in the file compare across workers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import require_private_directory
from ..durable import write_atomically
from ..locking import exclusive_lock


@dataclass(frozen=True)
class Outcome:
    value: Any
    shared: bool  # True: another request's call (running, or recent), not one made for this request


class CoalescedCall:
    def __init__(self, directory: Path, name: str, *, min_interval: float, wait: float):
        require_private_directory(directory, os.geteuid())  # whoever can write there can answer for every node
        self.lock_path = directory / f"{name}.lock"
        self.result_path = directory / f"{name}.json"
        self.name = name
        self.min_interval = min_interval
        self.wait = wait

    def run(self, call: Callable[[], Any], *, fresh: bool = False) -> Outcome:
        """`call()`'s result, or one shared with others. fresh: only a call that starts after
        this one arrived will do (the state it reports on has just changed)."""
        arrived = time.monotonic()
        last = self._last()
        if self._usable(last, arrived, fresh):
            return Outcome(last["value"], shared=True)
        with exclusive_lock(self.lock_path, timeout=self.wait, what=self.name):
            last = self._last()  # whoever held the lock may have just done the work
            if self._usable(last, arrived, fresh):
                return Outcome(last["value"], shared=True)
            started = time.monotonic()
            value = call()
            self._store({"started": started, "finished": time.monotonic(), "value": value})
        return Outcome(value, shared=False)

    def _usable(self, last: dict | None, arrived: float, fresh: bool) -> bool:
        if last is None:
            return False
        if fresh:
            return last["started"] >= arrived
        return last["finished"] >= arrived - self.min_interval

    def _last(self) -> dict | None:
        try:
            with open(os.open(self.result_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as stream:
                last = json.loads(stream.read())
            float(last["started"]), float(last["finished"]), last["value"]
            return last
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none yet, or unreadable: make a new call

    def _store(self, result: dict) -> None:
        """Written aside (O_EXCL | O_NOFOLLOW, an unpredictable name), then renamed: a reader sees the old result or the new one."""
        write_atomically(self.result_path, json.dumps(result).encode(), mode=0o600)
