"""Watching a request for secrets where they must never be: any process's argv (every exec,
recorded by the kernel's audit as it starts), any process's environment (every exec's, copied
by a bpftrace probe as it starts: audit does not record it), the CLI's syslog lines, and every
log file written meanwhile."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from helpers_vm import OUT
from support.execlog import ExecRecorder
from support.envlog import EnvRecorder

# Every log the system writes: the API's stdout/stderr, /var/log, the service's runtime files.
LOG_ROOTS = [OUT, Path("/var/log"), Path("/run/luksctl-api")]
NOT_THE_PRODUCTS = {OUT / "pytest.log", OUT / "junit.xml", OUT / "bao.log"}  # ours, and Vault's own

class SyslogCatcher(threading.Thread):
    """Plays syslogd on /dev/log, so the CLI's audit line is kept and read. A real /dev/log
    (journald's, say) is moved aside meanwhile: what the CLI sends there is checked too."""

    saved = Path("/dev/log.before-syslog-catcher")

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.messages: list[bytes] = []
        if os.path.lexists("/dev/log"):
            os.rename("/dev/log", self.saved)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("/dev/log")
        os.chmod("/dev/log", 0o666)
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.messages.append(self.sock.recv(65536))
            except TimeoutError:
                continue

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.sock.close()
        Path("/dev/log").unlink(missing_ok=True)
        if os.path.lexists(self.saved):
            os.rename(self.saved, "/dev/log")


# README, "Audit": the CLI's line goes to syslog with facility authpriv, tag `luksctl`.
SYSLOG_AUDIT_LINE = re.compile(rb"<(?P<pri>\d+)>luksctl: (?P<json>\{.*\})\x00?")
SYSLOG_LUKSCTL_TAG = re.compile(rb"<\d+>luksctl: ")
LOG_AUTHPRIV, LOG_INFO = 10, 6


def parse_syslog_audit(message: bytes) -> dict:
    """The CLI's audit entry from one syslog datagram, or an AssertionError saying what is off."""
    match = SYSLOG_AUDIT_LINE.fullmatch(message)
    assert match, f"not an audit line tagged luksctl: {message!r}"
    assert int(match["pri"]) == LOG_AUTHPRIV * 8 + LOG_INFO, f"not authpriv.info: {message!r}"
    entry = json.loads(match["json"])
    assert entry["audit"] == "luksctl", entry
    return entry


def files_written_since(roots: list[Path], since: float, skip: set[Path]) -> list[Path]:
    found = []
    for root in roots:
        if not root.exists():
            continue
        for path in [root] if root.is_file() else root.rglob("*"):
            try:
                info = path.lstat()
            except OSError:
                continue
            if path.is_file() and not path.is_symlink() and info.st_mtime >= since and path not in skip:
                found.append(path)
    return found


@dataclass
class Watch:
    needles: dict[str, bytes]
    execs: ExecRecorder
    environments: EnvRecorder
    catcher: SyslogCatcher
    logs: list[Path] = field(default_factory=list)

    def cli_audit_lines(self) -> list[tuple]:
        """(action, client, outcome, status) of each line the CLI sent to syslog, parsed.
        sudo logs each command it runs to syslog too (its own tag): those lines are scanned, not parsed."""
        entries = [parse_syslog_audit(m) for m in self.catcher.messages if SYSLOG_LUKSCTL_TAG.match(m)]
        return [(e["action"], e["client"], e["outcome"], e["status"]) for e in entries]

    def assert_nothing_leaked(self) -> None:
        assert any(path.name.startswith("api.") for path in self.logs), f"the API's logs were not read: {self.logs}"
        leaks = [(name, str(path)) for path in self.logs for name, needle in self.needles.items() if needle in path.read_bytes()]
        leaks += [(name, "syslog") for m in self.catcher.messages for name, needle in self.needles.items() if needle in m]
        assert not leaks, f"secrets written to logs: {leaks}"
        assert not self.argv_hits(), f"secrets on an argv: {self.argv_hits()}"
        assert not self.environ_hits(), f"secrets in an environment: {self.environ_hits()}"

    def argv_hits(self) -> list[tuple[str, int, list[bytes]]]:
        return self.execs.hits(self.needles)

    def environ_hits(self) -> list[tuple[str, int]]:
        return self.environments.hits(self.needles)


@contextmanager
def watch_for_leaks(needles: dict[str, bytes]) -> Iterator[Watch]:
    """Records every exec's argv and environment and catches syslog while the block runs; then
    lists the logs written meanwhile, and the API's (all its starts). The caller asserts on the
    Watch, after adding to its needles any secret made during the block. A recording that lost
    a record or missed its own canaries (it was not recording) fails here."""
    started = time.time() - 2
    environments = EnvRecorder()
    environments.start()
    try:
        execs = ExecRecorder()
        execs.start()
        try:
            catcher = SyslogCatcher()
            catcher.start()
            watch = Watch(needles, execs, environments, catcher)
            try:
                yield watch
            finally:
                catcher.close()
        finally:
            execs.stop()  # the kernel's audit rules go, whatever happened
    finally:
        environments.stop()
    execs.check()
    environments.check()
    watch.logs = files_written_since(LOG_ROOTS, started, NOT_THE_PRODUCTS)
    watch.logs += [path for path in OUT.glob("api.*.log") if path not in watch.logs]
