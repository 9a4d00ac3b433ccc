"""locking.py with two real processes: a held lock times out (README: exit 6 / 503), and a
killed holder frees it at once (the kernel drops flock locks with their owner)."""

from __future__ import annotations

import signal
import time

import pytest
from lock_holder import lock_held_elsewhere
from test_cli import json_output, paths, run_cli  # noqa: F401 - paths is a fixture

from luksctl import cli
from luksctl.errors import EXIT_BUSY, LockTimeout
from luksctl.locking import exclusive_lock


def test_a_lock_another_process_holds_times_out(tmp_path):
    lock = tmp_path / "open.lock"
    with lock_held_elsewhere(lock):
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"^another open is still running after 0\.5 s"):
            with exclusive_lock(lock, timeout=0.5, what="open"):
                pytest.fail("got a lock another process holds")
        assert 0.5 <= time.monotonic() - started < 5


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    lock = tmp_path / "open.lock"
    with lock_held_elsewhere(lock) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        started = time.monotonic()
        with exclusive_lock(lock, timeout=10, what="open"):
            assert time.monotonic() - started < 1


def test_cli_open_exits_6_while_another_process_holds_the_lock(host, paths, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cli, "LOCK_WAIT", 0.5)  # the real wait is 200 s
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    with lock_held_elsewhere(paths.lock_file):
        assert run_cli(paths, "--json", "open", stdin=b"secret\n") == EXIT_BUSY == 6

    assert host.calls == []  # waited without touching the volume
    report = json_output(capsys)
    assert report["error"] == "another luksctl open or close is still running after 0.5 s; try again later"
    assert report["volume_state"] == "unmounted"
