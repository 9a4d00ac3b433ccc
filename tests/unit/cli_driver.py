"""Drives the root CLI in-process as sudo would: the passphrase on a pipe, one JSON line out."""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading

from luksctl.root.cli import Paths, main


def piped(data: bytes) -> io.BufferedReader:
    """The read end of a pipe holding `data`, closed by its writer: what sudo gives luksctl."""
    read_fd, write_fd = os.pipe()

    def write():
        with contextlib.suppress(BrokenPipeError), open(write_fd, "wb") as writer:  # the CLI may not read
            writer.write(data)

    threading.Thread(target=write, daemon=True).start()  # a thread: data may exceed the pipe buffer
    return open(read_fd, "rb")  # buffered, like sys.stdin.buffer


def run_cli(paths: Paths, *argv: str, stdin: bytes | io.RawIOBase = b"") -> int:
    stream = piped(stdin) if isinstance(stdin, bytes) else stdin
    try:
        return main(list(argv), paths=paths, stdin=stream, stdin_is_tty=False)
    finally:
        stream.close()


def json_output(capsys) -> dict:
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1, out
    return json.loads(out)
