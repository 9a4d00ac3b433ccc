"""The process table (/proc) as the VM tests read it: a snapshot. Secrets are searched for in
what each exec started with, recorded as it starts (support.execlog for argv, support.envlog for
the environment), not here: a sampler of /proc misses a process that lives a millisecond."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple


class Process(NamedTuple):
    ppid: int
    pgrp: int
    state: str  # R, S, T (stopped), Z (zombie)...
    argv: list[bytes]


def processes() -> dict[int, Process]:
    """Every process right now, by pid."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                argv = [a for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if a]
                table[int(entry)] = Process(int(fields[1]), int(fields[2]), fields[0], argv)
            except (OSError, IndexError, ValueError):
                continue
    return table


def descends_from(pid: int, ancestor: int, table: dict[int, Process]) -> bool:
    while pid in table and pid > 1:
        if pid == ancestor:
            return True
        pid = table[pid].ppid
    return False


def is_privileged_open(argv: list[bytes]) -> bool:
    """`sudo -n .../luksctl --json open` or the luksctl interpreter it runs."""
    return b"open" in argv and any(arg.endswith(b"/luksctl") for arg in argv)
