"""The only place that starts processes.

argv lists only (never a shell), binaries resolved on a fixed PATH, LC_ALL=C
so output parses the same everywhere, a timeout on every call, and secrets
only on stdin. Logged argv never holds a secret because argv never does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CommandFailed

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENVIRONMENT = {"PATH": SAFE_PATH, "LC_ALL": "C"}


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def resolve(binary: str) -> str:
    """Absolute path of `binary` on SAFE_PATH; the caller's PATH is never trusted."""
    if binary.startswith("/"):
        return binary
    import shutil  # here and in run(): `luksctl status` imports this module but starts no process

    found = shutil.which(binary, path=SAFE_PATH)
    if found is None:
        raise CommandFailed(f"{binary} is not installed (looked in {SAFE_PATH})", [binary], None, "")
    return found


# Both ways of running: the fixed environment, and no descriptor of ours inherited.
PROCESS_OPTIONS = {"env": ENVIRONMENT, "close_fds": True}


def _resolved(argv: list[str]) -> list[str]:
    full_argv = [resolve(argv[0]), *argv[1:]]
    log.debug("running %s", full_argv)
    return full_argv


# The two failures without an exit code, worded alike for both ways of running. `argv` as the
# caller gave it names the command; `full_argv` is what ran.
def _timed_out(argv: list[str], full_argv: list[str], timeout: float, stderr: bytes) -> CommandFailed:
    return CommandFailed(f"{argv[0]} did not finish within {timeout:g} s", full_argv, None, stderr.decode("utf-8", "replace"))


def _not_started(argv: list[str], full_argv: list[str], exc: OSError) -> CommandFailed:
    return CommandFailed(f"{argv[0]} could not be started: {exc.strerror}", full_argv, None, "")


def run(argv: list[str], *, timeout: float, stdin: bytes | None = None, check: bool = True) -> Result:
    """Run argv[0] (resolved) with `stdin` bytes as its standard input.

    With check=True a non-zero exit raises CommandFailed carrying argv, exit
    code and stderr; with check=False the caller decides what the code means.
    """
    import subprocess

    full_argv = _resolved(argv)
    try:
        completed = subprocess.run(
            full_argv,
            input=stdin if stdin is not None else b"",
            capture_output=True,
            timeout=timeout,
            check=False,
            **PROCESS_OPTIONS,
        )
    except subprocess.TimeoutExpired:
        raise _timed_out(argv, full_argv, timeout, b"") from None
    except OSError as exc:
        raise _not_started(argv, full_argv, exc) from None
    result = Result(
        full_argv,
        completed.returncode,
        completed.stdout.decode("utf-8", "replace"),
        completed.stderr.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise CommandFailed(f"{argv[0]} failed with exit code {result.returncode}", full_argv, result.returncode, result.stderr)
    return result


def run_streaming(argv: list[str], *, timeout: float, stdin: bytes, on_line: Callable[[str], None] | None) -> Result:
    """run() for a long command whose progress the user watches as it goes.

    on_line gets each stdout line as it comes; with None the command writes to our own stdout
    (a terminal shows its progress bar). stderr is kept for the Result. At the deadline the
    command is killed and CommandFailed raised, as in run(); the caller decides what the exit
    code means.
    """
    import selectors
    import subprocess

    full_argv = _resolved(argv)
    deadline = time.monotonic() + timeout
    try:
        process = subprocess.Popen(full_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE if on_line else None,
                                   stderr=subprocess.PIPE, **PROCESS_OPTIONS)
    except OSError as exc:
        raise _not_started(argv, full_argv, exc) from None
    with process, selectors.DefaultSelector() as selector:
        try:
            process.stdin.write(stdin)  # a passphrase or two: far below a pipe's buffer
            process.stdin.close()
        except BrokenPipeError:  # it exited without reading them: its exit code says why
            pass
        selector.register(process.stderr, selectors.EVENT_READ)
        if on_line:
            selector.register(process.stdout, selectors.EVENT_READ)
        errors, pending_line = b"", b""
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                process.kill()
                raise _timed_out(argv, full_argv, timeout, errors)
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                if key.fileobj is process.stderr:
                    errors += chunk
                    continue
                *lines, pending_line = (pending_line + chunk).split(b"\n")
                if not chunk and pending_line:  # a last line without its newline
                    lines, pending_line = [pending_line], b""
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
        returncode = process.wait(max(deadline - time.monotonic(), 1))
    return Result(full_argv, returncode, "", errors.decode("utf-8", "replace"))
