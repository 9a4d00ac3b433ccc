"""Another process holding a luksctl lock: the real flock(2), not a thread of the test's own."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Takes the lock, says so, and keeps it until its stdin closes (or it is killed).
HOLDER = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


@contextlib.contextmanager
def lock_held_elsewhere(path: Path) -> Iterator[subprocess.Popen]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n", "the other process did not take the lock"
        yield holder
    finally:
        holder.kill()
        holder.wait(10)


def lock_is_free(path: Path) -> bool:
    """Whether another process could take the lock right now (and it lets it go at once)."""
    probe = "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\nfcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, timeout=30).returncode == 0


def sudo_luksctl(directory: Path) -> tuple[Path, Path]:
    """(sudo, luksctl) for SudoBridge: a `sudo` that only drops `-n`, and the real CLI in its own
    process, reading its ini, config.json and lock file from `directory`. It runs unprivileged,
    so it is told it is root; the lock wait and the exit code are what these tests are about."""
    sudo = directory / "sudo"
    sudo.write_text('#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')
    luksctl = directory / "luksctl"
    luksctl.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "from pathlib import Path\n"
        "from luksctl.root import cli\n"
        "os.geteuid = lambda: 0\n"
        f"here = Path({str(directory)!r})\n"
        "paths = cli.Paths(here / 'luks-cryptdev.ini', here / 'config.json', here / 'luksctl.lock', root_owned=False)\n"
        "sys.exit(cli.main(paths=paths))\n"
    )
    for script in (sudo, luksctl):
        script.chmod(0o755)
    return sudo, luksctl
