"""Every exec's environment, recorded by the kernel as the new program starts: a bpftrace probe
on sched:sched_process_exec copies the process's environment block (mm->env_start..env_end, the
strings the kernel has just put on its stack) into bpftrace's output, 64 bytes at a time.

The audit subsystem records argv only (support.execlog), and a /proc sampler misses a process
that lives a millisecond. This misses no exec, and says when it did miss one: bpftrace reports
every event its buffer dropped ("Lost N events"), and the recorder fails if it reported any or
if it did not record the canary environments it execs itself once it starts and right before it
stops (so a recorder that saw nothing cannot pass). A chunk bpftrace could not read comes out as
zeros, which no environment holds (its strings are NAME=value), so the recorder fails on one.
Limit: an environment over ENV_LIMIT bytes is recorded up to that size, and the recorder fails
if it met one."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from support.execlog import Recording

CHUNK = 64  # bpftrace 0.17's largest buf() by default (BPFTRACE_STRLEN)
ENV_LIMIT = 32768  # bytes of one environment the probe copies: 512 chunks, a bounded loop
# The last chunk ends at env_end rather than running past it: the stack's top page ends a few
# bytes after the environment, and a read across it would fail and lose the whole chunk.
PROGRAM = f"""
tracepoint:sched:sched_process_exec
{{
    $start = (int64)curtask->mm->env_start;
    $size = (int64)curtask->mm->env_end - $start;
    $exec = nsecs;
    printf("E %d %lld %lld %s\\n", pid, $exec, $size, comm);
    $offset = (int64)0;
    while ($offset < $size && $offset < {ENV_LIMIT}) {{
        $at = $offset + {CHUNK} > $size ? $size - {CHUNK} : $offset;
        printf("C %d %lld %lld %rx\\n", pid, $exec, $at, buf(uptr((uint8 *)($start + $at)), {CHUNK}));
        $offset += {CHUNK};
    }}
}}
"""
CANARY_VARIABLE = "LUKSCTL_ENVLOG_CANARY"
LINE = re.compile(rb"^(?:E (\d+) (\d+) (-?\d+) (.*)|C (\d+) (\d+) (-?\d+) (.*)|Lost (\d+) events)$")


class ExecEnvironment(NamedTuple):
    pid: int
    program: bytes  # the kernel's comm: the file's name, 15 bytes at most
    environ: bytes  # NUL-separated NAME=value strings, as /proc/PID/environ shows them


def unescape(printed: bytes) -> bytes:
    """bpftrace's %rx: every byte as \\xNN."""
    return bytes.fromhex(printed.replace(b"\\x", b"").decode())


class Recorded(NamedTuple):
    environments: list[ExecEnvironment]
    lost: int  # events bpftrace's buffers dropped
    too_large: int  # environments over ENV_LIMIT
    unreadable: int  # chunks the probe could not read (all zeros)


def parse(output: bytes) -> Recorded:
    execs: dict[tuple[int, int], tuple[int, bytes]] = {}  # (pid, exec time): (size, program)
    chunks: dict[tuple[int, int], dict[int, bytes]] = defaultdict(dict)
    lost = 0
    for line in output.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        if match[1]:
            execs[int(match[1]), int(match[2])] = int(match[3]), match[4]
        elif match[5]:
            chunks[int(match[5]), int(match[6])][int(match[7])] = unescape(match[8])
        else:
            lost += int(match[9])
    environments, too_large = [], 0
    unreadable = sum(data == bytes(CHUNK) for by_offset in chunks.values() for data in by_offset.values())
    for (pid, exec_time), (size, program) in execs.items():
        block = bytearray(min(size, ENV_LIMIT))
        for offset, data in chunks[pid, exec_time].items():
            piece = data[max(0, -offset):len(block) - offset]  # a chunk may start before env_start
            block[max(0, offset):max(0, offset) + len(piece)] = piece
        environments.append(ExecEnvironment(pid, program, bytes(block)))
        too_large += size > ENV_LIMIT
    return Recorded(environments, lost, too_large, unreadable)


class EnvRecorder(Recording):
    """with EnvRecorder() as recorder: ... then recorder.environments, recorder.hits(needles)."""

    def __init__(self) -> None:
        self.environments: list[ExecEnvironment] = []
        self.lost = self.too_large = self.unreadable = 0
        self.last_canary_printed = False
        self.canaries: list[bytes] = []
        self.canaries_missed: list[bytes] = []

    def start(self) -> None:
        if not os.path.ismount("/sys/kernel/tracing"):  # the probe's tracepoint is described there
            subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"], check=True)
        self.directory = tempfile.TemporaryDirectory(prefix="envlog.")  # bpftrace's output, the canary programs
        self.output = Path(self.directory.name) / "bpftrace.out"
        # Room for bursts: 16 MiB a CPU, where a Python start with a 2 KiB environment is 2 KiB.
        env = {"PATH": os.environ["PATH"], "BPFTRACE_PERF_RB_PAGES": "4096"}
        # Appended through a descriptor of bpftrace's own: with one shared file offset, a read
        # here moved where bpftrace wrote next, over lines already written.
        with self.output.open("ab") as output:
            self.tracer = subprocess.Popen(["bpftrace", "-e", PROGRAM], stdout=output, stderr=subprocess.STDOUT, env=env)
        # The probe is compiled first (tens of seconds under emulation), and bpftrace says
        # "Attaching" before it attaches: canaries until one is recorded.
        deadline = time.monotonic() + 120
        while not self._canary(wait=1):
            assert self.tracer.poll() is None and time.monotonic() < deadline, \
                f"bpftrace did not record its canary: {self._output()[-2000:]!r}"

    def stop(self) -> None:
        try:
            self.last_canary_printed = self._canary(wait=30)
        finally:
            self.tracer.send_signal(signal.SIGINT)
            self.tracer.wait(60)
        self.environments, self.lost, self.too_large, self.unreadable = parse(self._output())
        self.directory.cleanup()
        recorded = {environment.environ for environment in self.environments}
        self.canaries_missed = [canary for canary in self.canaries
                                if not any(f"{CANARY_VARIABLE}=".encode() + canary in environ for environ in recorded)]
        self.environments = [environment for environment in self.environments
                             if CANARY_VARIABLE.encode() not in environment.environ]  # without our own

    def _output(self, since: int = 0) -> bytes:
        with self.output.open("rb") as output:
            output.seek(since)
            return output.read()

    def _canary(self, wait: float) -> bool:
        """Execs /bin/true under a name of its own, the canary in its environment; whether bpftrace
        printed that exec within `wait` seconds. Only a canary it printed is checked in the recording."""
        canary = secrets.token_hex(16).encode()
        name = f"envcanary{canary[:6].decode()}"  # the kernel's comm keeps 15 bytes
        program = Path(self.directory.name) / name
        program.symlink_to("/bin/true")
        since = self.output.stat().st_size  # its line comes after: the whole output is not read again
        subprocess.run([program], env={CANARY_VARIABLE: canary.decode()}, check=True)
        deadline = time.monotonic() + wait
        while not re.search(rb"^E \d+ \d+ \d+ " + name.encode() + rb"$", self._output(since), re.M):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        self.canaries.append(canary)
        return True

    def check(self) -> None:
        """Fails unless the recording is complete: no event lost, none cut short, the canaries of the
        start and the stop printed and their environments decoded."""
        assert self.last_canary_printed, "bpftrace did not print the canary exec made as it stopped: it was not recording"
        assert self.lost == 0, f"bpftrace lost {self.lost} events: an environment may have gone unrecorded"
        assert self.too_large == 0, f"{self.too_large} environments over {ENV_LIMIT} bytes were recorded only in part"
        assert self.unreadable == 0, f"bpftrace could not read {self.unreadable} chunks of environments"
        assert not self.canaries_missed, f"the recorder missed its own canary environments {self.canaries_missed}: it was not recording"

    def ran(self, program: bytes) -> bool:
        """Whether a recorded exec ran `program` (b"cryptsetup"): the recording saw the step at work."""
        return any(environment.program == program for environment in self.environments)

    def hits(self, needles: dict[str, bytes]) -> list[tuple[str, int]]:
        """(secret's name, pid) for each exec whose environment holds a secret."""
        return [(name, environment.pid) for environment in self.environments
                for name, needle in needles.items() if needle in environment.environ]
