"""Files that survive a power loss whole or not at all.

Write to a new file in the same directory, fsync it, rename it over the
target, fsync the directory: after a crash the target holds either the old
content or the new, never a mix, and never a file that a reboot forgets. A kill
between the two leaves the new file's temporary behind: leftover_temporaries
finds it, for the owner of the target to remove.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

TEMPORARY_SUFFIX = re.compile(r"\.[0-9a-f]{8}\.tmp")


def leftover_temporaries(path: Path) -> list[Path]:
    """The temporaries of writes to `path` that were killed before their rename."""
    prefix = f".{path.name}"
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(path.parent / name for name in names if name.startswith(prefix) and TEMPORARY_SUFFIX.fullmatch(name[len(prefix):]))


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int, replace: bool = True) -> None:
    """Replace `path` with `data`; the file is created with `mode` (never wider, whatever the umask).

    replace=False never replaces an existing `path`: link(2) raises FileExistsError instead.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # as TEMPORARY_SUFFIX matches
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


def remove_durably(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_directory(path.parent)
