"""The process table (/proc) as the VM tests read it: a snapshot, and a sampler that keeps every
argv and environment it saw, to search for secrets afterwards. The sampler misses short-lived
processes; argv is recorded at exec time by support.execlog instead, and the sampler is kept
for the environment, which the kernel's audit does not record."""

from __future__ import annotations

import os
import threading
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


class ProcSampler(threading.Thread):
    """Reads every /proc/<pid>/cmdline and environ again and again and keeps each distinct one,
    searched afterwards: a secret made during the run (rotate's new passphrase) is known only then."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopping = threading.Event()
        self.seen: set[tuple[int, bytes, bytes]] = set()  # (pid, cmdline, environ)
        self.sweeps = 0
        self.privileged_seen: set[int] = set()  # sudo/luksctl pids whose environ we read
        self.cryptsetup_seen: set[int] = set()  # cryptsetup itself (argv[0]), not a wrapper script

    def run(self) -> None:
        while not self.stopping.is_set():
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    environ = Path(f"/proc/{entry}/environ").read_bytes()
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
                self.seen.add((int(entry), cmdline, environ))
                argv = [arg for arg in cmdline.split(b"\0") if arg]
                if is_privileged_open(argv):
                    self.privileged_seen.add(int(entry))
                if argv and os.path.basename(argv[0]) == b"cryptsetup":
                    self.cryptsetup_seen.add(int(entry))
            self.sweeps += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def hits(self, needles: dict[str, bytes]) -> list[tuple[str, int, str, bytes]]:
        """(secret's name, pid, "cmdline" or "environ", the process's cmdline) for each sighting."""
        return sorted({(name, pid, where, cmdline[:200]) for pid, cmdline, environ in self.seen
                       for where, data in (("cmdline", cmdline), ("environ", environ))
                       for name, needle in needles.items() if needle in data})

    def environ_hits(self, needles: dict[str, bytes]) -> list[tuple[str, int, str, bytes]]:
        return [hit for hit in self.hits(needles) if hit[2] == "environ"]
