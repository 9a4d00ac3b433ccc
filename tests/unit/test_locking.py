"""locking.py with two real processes: a held lock times out (README: exit 6 / 503), and a
killed holder frees it at once (the kernel drops flock locks with their owner)."""

from __future__ import annotations

import json
import signal
import time

import pytest
from lock_holder import lock_held_elsewhere, sudo_luksctl
from cli_driver import json_output, run_cli

from luksctl.api import privileged
from luksctl.errors import EXIT_BUSY, LockTimeout
from luksctl.locking import exclusive_lock
from luksctl.root import cli


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


def test_cli_open_exits_6_while_another_process_holds_the_lock(host, paths, capsys, monkeypatch):
    monkeypatch.setattr(cli, "LOCK_WAIT", 0.5)  # the real wait is 200 s
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    with lock_held_elsewhere(paths.lock_file):
        assert run_cli(paths, "--json", "open", stdin=b"secret\n") == EXIT_BUSY == 6

    assert host.calls == []  # waited without touching the volume
    report = json_output(capsys)
    assert report["error"] == "another luksctl open or close is still running after 0.5 s; try again later"
    assert report["volume_state"] == "unmounted"


@pytest.mark.parametrize("config", [{}, {"NFS_MOUNTPOINT_LIST": ["/nonexistent-nfs-share"]}], ids=["open", "nfs-mount"])
def test_the_cli_gives_up_on_the_lock_before_the_service_gives_up_on_the_cli(paths, monkeypatch, config):
    """The service's `sudo luksctl` call ends at PRIVILEGED_TIMEOUT: a CLI still waiting for the lock
    then would be killed, and the service would answer 500 instead of the documented 503."""
    timeout = 4.0
    sudo, luksctl = sudo_luksctl(paths.volume_ini.parent)
    paths.api_config.write_text(json.dumps({**config, "PRIVILEGED_TIMEOUT": timeout}))
    monkeypatch.setattr(privileged, "SUDO", str(sudo))
    bridge = privileged.SudoBridge(str(luksctl), timeout)
    call = bridge.nfs_mount if config else lambda: bridge.open_volume("secret")

    with lock_held_elsewhere(paths.lock_file):
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"still running after 2 s; try again later$") as refused:
            call()
        waited = time.monotonic() - started

    assert refused.value.http_status == 503 and refused.value.exit_code == EXIT_BUSY
    assert timeout * cli.SERVICE_LOCK_SHARE <= waited < timeout
