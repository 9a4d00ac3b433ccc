"""Every exec on the machine, recorded by the kernel as it starts: the audit subsystem's execve
records, written by an auditd of our own, then searched for secrets on argv.

Unlike a /proc sampler this misses no exec however short-lived the process, and says when it did
miss one: the kernel counts each record it drops (`auditctl -s`, "lost"), and the recorder fails
if that count moved or if it did not record the canary execs it makes itself right after it
starts and right before it stops (so a recorder that saw nothing cannot pass). Two limits: only
processes forked after audit was first enabled on this boot are recorded (see
audit_every_new_process), and audit does not record the environment (envp)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Self

KEY = "luksctl-leak"
RULES = [["always,exit", "-F", f"arch={arch}", "-S", "execve", "-S", "execveat", "-k", KEY] for arch in ("b64", "b32")]
BACKLOG = 65536  # records the kernel queues for auditd before it waits or drops
OWN_EXECS = [[b"auditctl", b"-d", *(arg.encode() for arg in rule)] for rule in RULES]  # stop's, recorded
CANARY_PROGRAM = b"/bin/true"  # run with a unique argument: proof that the recording works
LOCK = Path("/run/luksctl-execlog.lock")  # one recorder at a time on a machine: the kernel has one audit
DECODER = Path(__file__).with_name("execlog_decode.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-audit's auparse


class Exec(NamedTuple):
    pid: int
    argv: list[bytes]


def audit_status() -> dict[str, int]:
    """`auditctl -s` as numbers: enabled, failure, pid (the registered auditd), backlog_limit, lost..."""
    out = subprocess.run(["auditctl", "-s"], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value, *_ in (line.split() for line in out.splitlines()) if value.isdigit()}


def auditctl(*args: str) -> None:
    subprocess.run(["auditctl", *args], capture_output=True, check=True)


def audit_every_new_process() -> None:
    """The kernel gives a process an audit context only if it was forked after audit was first
    enabled on this boot; an older process's execs are never recorded. Enabling audit once (then
    putting the setting back) makes every process forked from now on recordable."""
    enabled = audit_status()["enabled"]
    auditctl("-e", "1")
    auditctl("-e", str(enabled))


def daemon_config(directory: Path) -> str:
    # One log that never rotates and no action on disk space: the test reads it whole afterwards.
    return "\n".join([
        f"log_file = {directory / 'audit.log'}", "log_format = RAW", "log_group = root", "write_logs = yes",
        "flush = INCREMENTAL_ASYNC", "freq = 100", "num_logs = 0", "max_log_file_action = IGNORE",
        "space_left = 2", "space_left_action = IGNORE", "admin_space_left = 1", "admin_space_left_action = IGNORE",
        "disk_full_action = IGNORE", "disk_error_action = SYSLOG", ""])


class Recording:
    """A recorder as a context manager: start() on entry; on exit stop(), then check() unless the
    block failed (its own error is the one to see)."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.stop()
        if kind is None:
            self.check()


class ExecRecorder(Recording):
    """with ExecRecorder() as recorder: ... then recorder.execs, recorder.hits(needles).
    Leaves the kernel's audit settings as it found them, even when the block fails."""

    def __init__(self) -> None:
        self.execs: list[Exec] = []
        self.lost = 0
        self.canaries: list[bytes] = []  # the argument of each canary exec
        self.canaries_missed: list[bytes] = []

    def start(self) -> None:
        self.lock = LOCK.open("a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)  # another test run's recorder: wait for it
        try:
            self._start()
        except BaseException:
            self.lock.close()
            raise

    def _start(self) -> None:
        self.before = audit_status()
        if self.before["pid"]:
            raise RuntimeError(f"an audit daemon (pid {self.before['pid']}) already holds the kernel's audit; the recorder needs its own")
        self.directory = Path(tempfile.mkdtemp(prefix="execlog."))
        config = self.directory / "auditd.conf"
        config.write_text(daemon_config(self.directory))
        config.chmod(0o600)  # auditd refuses a config others can write
        self.daemon = subprocess.Popen(["auditd", "-n", "-c", str(self.directory)], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=(self.directory / "auditd.err").open("wb"))
        try:
            deadline = time.monotonic() + 10
            while audit_status()["pid"] != self.daemon.pid:
                assert self.daemon.poll() is None and time.monotonic() < deadline, \
                    f"auditd did not register: {(self.directory / 'auditd.err').read_text()}"
                time.sleep(0.05)
            auditctl("-e", "1", "-b", str(BACKLOG), "-f", "1")  # -f 1: a dropped record is also printed by the kernel
            for rule in RULES:
                auditctl("-a", *rule)
            self.lost_before = audit_status()["lost"]
            self._canary()
        except BaseException:
            self._shut_down()
            raise

    def stop(self) -> None:
        """Removes the rules, stops auditd (which flushes its log), then decodes the log."""
        try:
            self._canary()
            self.lost = audit_status()["lost"] - self.lost_before
        finally:
            self._shut_down()
        decoding = subprocess.run([SYSTEM_PYTHON, str(DECODER), str(self.directory / "audit.log")], capture_output=True, text=True)
        assert decoding.returncode == 0, f"the audit log did not decode: {decoding.stderr[-2000:]}"
        decoded = decoding.stdout
        records = [Exec(record["pid"], [bytes.fromhex(arg) for arg in record["argv"]])
                   for record in map(json.loads, decoded.splitlines())]
        canaries = [[CANARY_PROGRAM, canary] for canary in self.canaries]
        self.canaries_missed = [canary for canary, argv in zip(self.canaries, canaries) if argv not in (r.argv for r in records)]
        self.execs = [record for record in records if record.argv not in OWN_EXECS + canaries]  # without our own
        shutil.rmtree(self.directory)

    def _shut_down(self) -> None:
        try:
            for rule in RULES:
                subprocess.run(["auditctl", "-d", *rule], capture_output=True)
            auditctl("-e", str(self.before["enabled"]), "-b", str(self.before["backlog_limit"]),
                     "-f", str(self.before["failure"]), "--backlog_wait_time", str(self.before["backlog_wait_time"]))
        finally:
            self.daemon.terminate()
            self.daemon.wait(30)
            self.lock.close()

    def _canary(self) -> None:
        canary = f"execlog-canary-{os.getpid()}-{time.monotonic_ns()}".encode()
        self.canaries.append(canary)
        subprocess.run([CANARY_PROGRAM, canary], check=True)

    def check(self) -> None:
        """Fails unless the recording is complete: no record lost, and both canaries recorded."""
        assert self.lost == 0, f"the kernel lost {self.lost} audit records: an exec may have gone unrecorded"
        assert not self.canaries_missed, f"the recorder missed its own canary execs {self.canaries_missed}: it was not recording"

    def ran(self, program: bytes) -> bool:
        """Whether a recorded exec's argv[0] names `program` (b"cryptsetup", with or without its path)."""
        return any(record.argv and os.path.basename(record.argv[0]) == program for record in self.execs)

    def hits(self, needles: dict[str, bytes]) -> list[tuple[str, int, list[bytes]]]:
        """(secret's name, pid, argv) for each exec whose argv holds a secret, whole or split across
        arguments (searched in the arguments joined by nothing and by the separators argv had)."""
        return [(name, record.pid, [arg[:200] for arg in record.argv]) for record in self.execs
                for name, needle in needles.items()
                if any(needle in joined for joined in (b"\0".join(record.argv), b"".join(record.argv), b" ".join(record.argv)))]
