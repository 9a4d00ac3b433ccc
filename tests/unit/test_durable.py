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
