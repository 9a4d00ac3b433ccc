"""durable.py: what is fsynced, and when. A power cut keeps only what reached the disk, so
each fsync is recorded at the os.fsync seam along with what the target held at that moment."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from luksctl import durable


class FsyncRecorder:
    """Each os.fsync as (kind, inode, what `target` held at that moment: bytes, or None if absent)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.calls: list[tuple[str, int, bytes | None]] = []
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        info = os.fstat(fd)
        held = self.target.read_bytes() if self.target.exists() else None
        self.calls.append(("directory" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino, held))
        self.real(fd)


@pytest.fixture
def fsyncs(tmp_path, monkeypatch) -> FsyncRecorder:
    recorder = FsyncRecorder(tmp_path / "pending")
    monkeypatch.setattr(os, "fsync", recorder)
    return recorder


@pytest.mark.parametrize("replace", [True, False])
def test_write_atomically_fsyncs_the_new_file_before_the_rename_and_the_directory_after(tmp_path, fsyncs, replace):
    target = fsyncs.target
    before = b"old" if replace else None
    if before:
        target.write_bytes(before)

    durable.write_atomically(target, b"new", mode=0o600, replace=replace)

    assert fsyncs.calls == [("file", target.stat().st_ino, before), ("directory", tmp_path.stat().st_ino, b"new")]


def test_remove_durably_fsyncs_the_directory_after_the_unlink(tmp_path, fsyncs):
    fsyncs.target.write_bytes(b"secret")

    durable.remove_durably(fsyncs.target)
    durable.remove_durably(fsyncs.target)  # already gone: nothing to make durable

    assert fsyncs.calls == [("directory", tmp_path.stat().st_ino, None)]



def test_a_write_killed_before_its_rename_leaves_a_temporary_that_leftover_temporaries_finds(tmp_path, monkeypatch):
    # A SIGKILL cannot be caught: look at the directory while the new file is fsynced, as a kill
    # then would leave it. leftover_temporaries is how the target's owner finds that file to remove.
    target = tmp_path / "pending"
    seen: list[tuple[list[Path], list[Path]]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if not seen:
            seen.append((durable.leftover_temporaries(target), sorted(tmp_path.iterdir())))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    durable.write_atomically(target, b"new", mode=0o600)

    found, present = seen[0]
    assert len(present) == 1 and found == present
    assert durable.leftover_temporaries(target) == []


def test_the_new_file_is_private_from_its_creation_on(tmp_path, monkeypatch):
    # fchmod narrows the mode again, but an fd opened in between keeps its access: open(2) itself
    # must give `mode`, whatever the umask.
    at_creation: list[int] = []
    real_fchmod = os.fchmod

    def fchmod(fd: int, mode: int) -> None:
        at_creation.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)
    old_umask = os.umask(0)
    try:
        durable.write_atomically(tmp_path / "pending", b"new", mode=0o600)
    finally:
        os.umask(old_umask)

    assert at_creation == [0o600]


def test_a_file_planted_at_the_temporary_name_is_refused_not_written_through(tmp_path, monkeypatch):
    target = tmp_path / "pending"
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: "deadbeef")
    planted = tmp_path / ".pending.deadbeef.tmp"
    planted.write_bytes(b"planted")

    with pytest.raises(FileExistsError):
        durable.write_atomically(target, b"secret", mode=0o600)

    assert planted.read_bytes() == b"planted" and not target.exists()


def test_a_failed_write_raises_its_own_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        durable.write_atomically(tmp_path / "pending", b"secret", mode=0o600)

    assert list(tmp_path.iterdir()) == []
