"""The one reader of secrets: passphrases and Vault tokens, from stdin or a file or FIFO.

Every read has a size limit and a deadline, so a writer that never closes its end gets an
error instead of holding the command forever. Commands read here before they take a lock.
"""

from __future__ import annotations

import io
import os
import select
import time
from typing import BinaryIO

from .errors import LuksctlError, StdinNotClosed

MAX_PASSPHRASE_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 4096
STDIN_DEADLINE = 30  # the API writes the passphrase and closes at once; a person pipes it in


def read_passphrase(stream: BinaryIO, is_tty: bool) -> bytes:
    """The passphrase as the old tools piped it: everything before one trailing newline."""
    if is_tty:
        import getpass

        return getpass.getpass("Passphrase: ").encode()
    data = _read_stream(stream, MAX_PASSPHRASE_BYTES + 1, "end the passphrase with end of file (printf '%s\\n' \"$PASS\" | luksctl open)")
    if len(data) > MAX_PASSPHRASE_BYTES:
        raise LuksctlError(f"the passphrase on stdin is longer than {MAX_PASSPHRASE_BYTES} bytes")
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise LuksctlError("no passphrase on stdin (pipe it in: printf '%s\\n' \"$PASS\" | luksctl open)")
    return data


def read_token(source: str, stdin: BinaryIO, what: str = "token") -> str:
    """A token (or a recovery key: `what`) from a file, a FIFO or stdin ("-"): never from argv,
    where every user can see it."""
    if source == "-":
        data = _read_stream(stdin, MAX_TOKEN_BYTES + 1, f"end the {what} with end of file")
    else:
        try:  # O_NONBLOCK: opening a FIFO nobody writes to must not block before the deadline starts
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise LuksctlError(f"the {what} file {source} cannot be read: {exc.strerror}") from None
        try:
            os.set_blocking(fd, True)
            data = read_until_eof(fd, MAX_TOKEN_BYTES + 1, STDIN_DEADLINE, f"end the {what} with end of file", what=source)
        finally:
            os.close(fd)
    token = data.strip()
    if not token or len(data) > MAX_TOKEN_BYTES or not all(33 <= byte < 127 for byte in token):
        raise LuksctlError(f"the {what} from {'stdin' if source == '-' else source} is empty, too long or not one printable word")
    return token.decode()


def _read_stream(stream: BinaryIO, limit: int, advice: str) -> bytes:
    try:
        fd = stream.fileno()
    except io.UnsupportedOperation:  # an in-memory stream (tests, callers of main()): nothing to wait for
        return stream.read(limit)
    return read_until_eof(fd, limit, STDIN_DEADLINE, advice)


def read_until_eof(fd: int, limit: int, timeout: float, advice: str, *, what: str = "stdin") -> bytes:
    """Up to `limit` bytes, until end of file, or StdinNotClosed after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise StdinNotClosed(f"{what} was not closed within {timeout:g} s; {advice}")
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
