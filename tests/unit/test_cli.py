"""cli.py: the root CLI end to end, with runner.run and the state read faked (see conftest.FakeHost)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import threading
import time

import pytest
from cli_driver import json_output, piped, run_cli

from luksctl import audit, runner, secret_input
from luksctl.config import FrontendConfig
from luksctl.errors import LuksctlError
from luksctl.root import cli, services, volume
from luksctl.root.cli import Paths, main
from luksctl.secret_input import read_passphrase

DEVICE = "/dev/disk/by-uuid/0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10"
REAL_RUN = runner.run  # before the `host` fixture fakes it


class UnreadableStdin(io.RawIOBase):
    """Fails the test if the CLI reads a passphrase it does not need."""

    def read(self, *args):
        raise AssertionError("stdin was read")

    def fileno(self):
        raise AssertionError("stdin was read")


def mountpoint(paths: Paths) -> str:
    return str(paths.volume_ini.parent / "export")


def open_argvs(paths: Paths) -> list[list[str]]:
    return [
        ["cryptsetup", "open", DEVICE, "xkqzbmwe", "--key-file=-"],
        ["mount", "-t", "ext4", "-o", "nosuid,nodev", "/dev/mapper/xkqzbmwe", mountpoint(paths)],
    ]


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


# --- read_passphrase ---------------------------------------------------------


@pytest.mark.parametrize(
    "sent, passphrase",
    [
        (b"pass\n", b"pass"),
        (b"pass\n\n", b"pass\n"),
        (b"pass", b"pass"),
        ("a b \\ ü\n".encode(), "a b \\ ü".encode()),
        (b" leading and trailing spaces \n", b" leading and trailing spaces "),
    ],
)
def test_read_passphrase_strips_exactly_one_trailing_newline(sent, passphrase):
    with piped(sent) as stream:
        assert read_passphrase(stream, is_tty=False) == passphrase


@pytest.mark.parametrize("sent", [b"", b"\n"])
def test_read_passphrase_rejects_an_empty_passphrase(sent):
    with piped(sent) as stream, pytest.raises(LuksctlError, match="no passphrase"):
        read_passphrase(stream, is_tty=False)


def test_read_passphrase_rejects_an_oversized_stream():
    with piped(b"x" * (secret_input.MAX_PASSPHRASE_BYTES + 1)) as stream, pytest.raises(LuksctlError, match="longer than"):
        read_passphrase(stream, is_tty=False)


def test_piped_passphrase_reaches_cryptsetup_byte_for_byte(host, paths):
    assert run_cli(paths, "open", stdin="a b \\ ü\n\n".encode()) == 0

    assert host.stdin_of("cryptsetup", "open") == "a b \\ ü\n".encode()


def test_empty_passphrase_runs_nothing(host, paths, capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)  # root: "not root" must not be why it fails
    assert run_cli(paths, "open", stdin=b"\n") == 4
    assert host.calls == []
    assert last_line(capsys) == "Encrypted volume: [ FAIL ]"

    assert run_cli(paths, "--json", "open", stdin=b"\n") == 4
    assert host.calls == []
    assert json_output(capsys)["error"].startswith("no passphrase on stdin")


# --- stdin that never closes ---------------------------------------------------


@contextlib.contextmanager
def never_closed_pipe(data: bytes = b""):
    """A pipe whose writer sent `data` and keeps its end open: a caller that never closes stdin."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    reader = open(read_fd, "rb")  # buffered, like sys.stdin.buffer
    try:
        yield reader
    finally:
        os.close(write_fd)  # unblocks a reader that has no deadline, so no test can hang here
        reader.close()


def in_thread(function, *args) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def call():
        box["result"] = function(*args)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("sent", [b"", b"passphrase but no end of file\n"])
def test_a_stdin_that_never_closes_is_an_error_after_the_deadline(monkeypatch, sent):
    monkeypatch.setattr(secret_input, "STDIN_DEADLINE", 0.3)
    errors = []

    def read(stream):
        try:
            read_passphrase(stream, is_tty=False)
        except LuksctlError as exc:
            errors.append(exc)

    with never_closed_pipe(sent) as stream:
        thread, _ = in_thread(read, stream)
        thread.join(5)
        assert not thread.is_alive(), "the read is still waiting for end of file"
    assert len(errors) == 1 and "not closed within 0.3 s" in errors[0].message


def test_a_token_fifo_that_nobody_writes_to_is_an_error_after_the_deadline(tmp_path, monkeypatch):
    """--token-file may name a FIFO: opening one with no writer blocks, unless the reader sees to it."""
    monkeypatch.setattr(secret_input, "STDIN_DEADLINE", 0.3)
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            secret_input.read_token(str(fifo), io.BytesIO())
        except LuksctlError as exc:
            errors.append(exc)

    thread, _ = in_thread(read)
    thread.join(5)
    if thread.is_alive():  # free the blocked reader before failing
        os.close(os.open(fifo, os.O_WRONLY))
    assert not thread.is_alive(), "the token read is still waiting on the FIFO"
    assert len(errors) == 1 and f"{fifo} was not closed within 0.3 s" in errors[0].message


def test_a_token_comes_through_a_fifo(tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    thread, box = in_thread(secret_input.read_token, str(fifo), io.BytesIO())
    with open(fifo, "wb") as writer:
        writer.write(b"hvs.through-a-fifo\n")
    thread.join(5)
    assert box["result"] == "hvs.through-a-fifo"


def test_open_with_a_stdin_that_never_closes_exits_64_and_runs_nothing(host, paths, monkeypatch, capsys):
    monkeypatch.setattr(secret_input, "STDIN_DEADLINE", 0.3)

    with never_closed_pipe(b"secret\n") as stream:
        opening, box = in_thread(lambda: run_cli(paths, "--json", "open", stdin=stream))
        opening.join(5)
        assert not opening.is_alive(), "open is still waiting for end of file"

    assert box["result"] == 64
    assert host.calls == []
    assert "not closed" in json_output(capsys)["error"]


def test_close_proceeds_while_an_open_waits_for_stdin(host, paths, monkeypatch):
    host.mapper_open = True  # half-open, so open goes on to read a passphrase
    monkeypatch.setattr(secret_input, "STDIN_DEADLINE", 60)
    monkeypatch.setattr(cli, "LOCK_WAIT", 2)  # a close blocked behind the open fails fast

    with never_closed_pipe() as stream:
        opening, _ = in_thread(lambda: run_cli(paths, "open", stdin=stream))
        time.sleep(0.3)  # the open is now waiting on stdin
        assert opening.is_alive()

        assert run_cli(paths, "close") == 0

        assert host.argvs == [["cryptsetup", "close", "xkqzbmwe"]]
    opening.join(5)


# --- status ------------------------------------------------------------------


def test_status_mounted_exits_0(host, paths, capsys):
    host.mapper_open = host.mounted = True

    assert run_cli(paths, "status") == 0
    assert last_line(capsys) == "Encrypted volume: [ OK ]"
    assert host.calls == []


@pytest.mark.parametrize("mapper_open", [False, True])
def test_status_not_mounted_exits_1(host, paths, capsys, mapper_open):
    host.mapper_open = mapper_open

    assert run_cli(paths, "status") == 1
    assert last_line(capsys) == "Encrypted volume: [ FAIL ]"


def test_status_json(host, paths, capsys):
    host.mapper_open = True

    assert run_cli(paths, "--json", "status") == 1
    assert json_output(capsys) == {"volume_state": "unmounted", "mapper_open": True, "mounted": False, "changed": False}


def test_json_flag_is_accepted_after_the_subcommand(host, paths, capsys):
    host.mapper_open = host.mounted = True

    assert run_cli(paths, "status", "--json") == 0
    assert json_output(capsys)["volume_state"] == "mounted"


def test_bad_config_exits_3(host, paths, capsys):
    paths.volume_ini.write_text("[luks]\nuuid = nope\n")

    assert run_cli(paths, "--json", "status") == 3
    report = json_output(capsys)
    assert report["volume_state"] == "unavailable"
    assert str(paths.volume_ini) in report["error"]


def test_missing_ini_exits_3(host, paths):
    paths.volume_ini.unlink()

    assert run_cli(paths, "open", stdin=b"pass\n") == 3
    assert host.calls == []


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["status", "/dev/sda"], ["--passphrase", "x", "open"]])
def test_usage_errors_exit_64(host, paths, argv):
    with pytest.raises(SystemExit) as caught:
        run_cli(paths, *argv)

    assert caught.value.code == 64
    assert host.calls == []


# --- open --------------------------------------------------------------------


def test_open_maps_mounts_and_reports_ok(host, paths, capsys):
    assert run_cli(paths, "open", stdin=b"secret\n") == 0

    assert host.argvs == open_argvs(paths)
    assert host.stdin_of("cryptsetup", "open") == b"secret"
    assert last_line(capsys) == "Encrypted volume: [ OK ]"


def test_open_json_reports_mounted_and_changed(host, paths, capsys):
    assert run_cli(paths, "open", "--json", stdin=b"secret\n") == 0

    report = json_output(capsys)
    assert report["volume_state"] == "mounted" and report["changed"] is True
    assert "error" not in report
    assert "secret" not in json.dumps(report)


def test_open_when_already_mounted_reads_no_passphrase_and_runs_nothing(host, paths, capsys):
    host.mapper_open = host.mounted = True

    assert run_cli(paths, "--json", "open", stdin=UnreadableStdin()) == 0

    assert host.calls == []
    assert json_output(capsys)["volume_state"] == "mounted"


def test_wrong_passphrase_exits_2_without_mounting(host, paths, capsys):
    host.fail("cryptsetup", "open", returncode=2, stderr="No key available with this passphrase.\n")

    assert run_cli(paths, "--json", "open", stdin=b"wrong\n") == 2

    assert host.argvs == open_argvs(paths)[:1]
    report = json_output(capsys)
    assert report["volume_state"] == "unmounted" and report["error"]
    assert "wrong" not in report["error"]


def test_mapped_but_not_mounted_with_a_wrong_passphrase_exits_2_and_stays_mapped(host, paths, capsys):
    host.mapper_open = True
    host.fail("cryptsetup", "open", "--test-passphrase", returncode=2, stderr="No key available with this passphrase.\n")

    assert run_cli(paths, "--json", "open", stdin=b"wrong\n") == 2

    assert host.argvs == [["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-file=-", DEVICE]]
    assert host.stdin_of("cryptsetup") == b"wrong"
    report = json_output(capsys)
    assert (report["volume_state"], report["mapper_open"], report["mounted"]) == ("unmounted", True, False)


def test_mount_options_come_from_config_json(host, paths):
    paths.api_config.write_text(json.dumps({"MOUNT_OPTIONS": "defaults"}))

    assert run_cli(paths, "open", stdin=b"secret\n") == 0

    assert host.argvs[-1] == ["mount", "-t", "ext4", "-o", "defaults", "/dev/mapper/xkqzbmwe", mountpoint(paths)]


def test_wrong_passphrase_text_output(host, paths, capsys):
    host.fail("cryptsetup", "open", returncode=2)

    assert run_cli(paths, "open", stdin=b"wrong\n") == 2
    assert last_line(capsys) == "Encrypted volume: [ FAIL ]"


def test_mount_failure_exits_4_and_closes_what_it_opened(host, paths, capsys):
    host.fail("mount", returncode=32, stderr="mount: wrong fs type\n")

    assert run_cli(paths, "--json", "open", stdin=b"secret\n") == 4

    assert host.argvs == open_argvs(paths) + [["cryptsetup", "close", "xkqzbmwe"]]
    report = json_output(capsys)
    assert report["volume_state"] == "unmounted" and report["mapper_open"] is False and report["error"]


def test_docker_config_restarts_docker_after_the_mount(host, paths):
    paths.api_config.write_text(json.dumps({"INFRASTRUCTURE_CONFIGURATION": "single_vm", "VIRTUALIZATION_TYPE": "docker"}))

    assert run_cli(paths, "open", stdin=b"secret\n") == 0

    assert host.argvs == open_argvs(paths) + [["systemctl", "restart", "docker"]]


def test_single_vm_runs_no_post_open_action(host, paths):
    paths.api_config.write_text(json.dumps({"INFRASTRUCTURE_CONFIGURATION": "single_vm"}))

    assert run_cli(paths, "open", stdin=b"secret\n") == 0

    assert host.argvs == open_argvs(paths)


def test_cluster_restarts_the_configured_nfs_service(host, paths):
    paths.api_config.write_text(
        json.dumps({"INFRASTRUCTURE_CONFIGURATION": "cluster", "WN_IPS": ["10.0.0.2"], "NFS_SERVICE": "nfs-ganesha"})
    )

    assert run_cli(paths, "open", stdin=b"secret\n") == 0

    assert host.argvs == open_argvs(paths) + [["systemctl", "restart", "nfs-ganesha"]]


def test_failed_post_open_action_exits_5_with_the_volume_mounted(host, paths, capsys, monkeypatch):
    paths.api_config.write_text(json.dumps({"VIRTUALIZATION_TYPE": "docker"}))
    # systemctl goes through the real runner.run with only its process faked, so the message
    # checked below is the one runner builds.
    started: list[list[str]] = []

    def systemctl_fails(argv, **kwargs):
        started.append(argv)
        return subprocess.CompletedProcess(argv, 1, b"", b"Unit docker.service not found.\n")

    fake_run = runner.run
    monkeypatch.setattr(subprocess, "run", systemctl_fails)  # runner imports subprocess when it runs
    monkeypatch.setattr(runner, "run", lambda argv, **kw: (REAL_RUN if argv[0] == "systemctl" else fake_run)(argv, **kw))

    assert run_cli(paths, "--json", "open", stdin=b"secret\n") == 5

    report = json_output(capsys)
    assert report["volume_state"] == "mounted"
    assert "restart docker" in report["error"]
    assert report["actions"] == [{"name": "restart docker", "ok": False, "error": "systemctl failed with exit code 1"}]
    assert started == [[runner.resolve("systemctl"), "restart", "docker"]]


def test_bad_api_config_stops_open_before_anything_runs(host, paths):
    paths.api_config.write_text(json.dumps({"INFRASTRUCTURE_CONFIGURATION": "cluster"}))

    assert run_cli(paths, "open", stdin=b"secret\n") == 3
    assert host.calls == []


# --- NFS service name ----------------------------------------------------------

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
UBUNTU = "NAME=Ubuntu\nID=ubuntu\nID_LIKE=debian\n"
ROCKY = 'NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\n'
ALMA = 'ID="almalinux"\nID_LIKE="rhel centos fedora"\n'


@pytest.mark.parametrize(
    "os_release, service",
    [(DEBIAN, "nfs-kernel-server"), (UBUNTU, "nfs-kernel-server"), (ROCKY, "nfs-server"), (ALMA, "nfs-server")],
)
def test_nfs_server_service_follows_os_release(tmp_path, os_release, service):
    path = tmp_path / "os-release"
    path.write_text(os_release)
    cluster = FrontendConfig(INFRASTRUCTURE_CONFIGURATION="cluster", WN_IPS=["10.0.0.2"])

    assert services.nfs_server_service(cluster, path) == service


def test_nfs_service_setting_overrides_os_release(tmp_path):
    path = tmp_path / "os-release"
    path.write_text(ROCKY)
    cluster = FrontendConfig(INFRASTRUCTURE_CONFIGURATION="cluster", WN_IPS=["10.0.0.2"], NFS_SERVICE="nfs-kernel-server")

    assert services.nfs_server_service(cluster, path) == "nfs-kernel-server"


def test_cluster_post_open_actions_on_rocky(host, tmp_path):
    path = tmp_path / "os-release"
    path.write_text(ROCKY)
    cluster = FrontendConfig(INFRASTRUCTURE_CONFIGURATION="cluster", WN_IPS=["10.0.0.2"], VIRTUALIZATION_TYPE="docker")

    results = services.run_post_open_actions(cluster, path)

    assert host.argvs == [["systemctl", "restart", "docker"], ["systemctl", "restart", "nfs-server"]]
    assert all(result.ok for result in results)


def test_one_failed_action_does_not_skip_the_next(host, tmp_path):
    path = tmp_path / "os-release"
    path.write_text(DEBIAN)
    host.fail("systemctl", "restart", "docker", returncode=1)
    cluster = FrontendConfig(INFRASTRUCTURE_CONFIGURATION="cluster", WN_IPS=["10.0.0.2"], VIRTUALIZATION_TYPE="docker")

    results = services.run_post_open_actions(cluster, path)

    assert host.argvs == [["systemctl", "restart", "docker"], ["systemctl", "restart", "nfs-kernel-server"]]
    assert [result.ok for result in results] == [False, True]


# --- close -------------------------------------------------------------------


def test_close_unmounts_then_closes_and_reports_ok(host, paths, capsys):
    host.mapper_open = host.mounted = True

    assert run_cli(paths, "close") == 0

    assert host.argvs == [["umount", mountpoint(paths)], ["cryptsetup", "close", "xkqzbmwe"]]
    assert last_line(capsys) == "Encrypted volume umount: [ OK ]"


def test_close_when_closed_is_ok_and_runs_nothing(host, paths, capsys):
    assert run_cli(paths, "close") == 0

    assert host.calls == []
    assert last_line(capsys) == "Encrypted volume umount: [ OK ]"


def test_close_busy_exits_1_and_keeps_the_volume_open(host, paths, capsys):
    host.mapper_open = host.mounted = True
    host.fail("umount", returncode=32, stderr=f"umount: {mountpoint(paths)}: target is busy.\n")

    assert run_cli(paths, "close") == 1

    assert host.argvs == [["umount", mountpoint(paths)]]
    assert last_line(capsys) == "Encrypted volume umount: [ FAIL ]"


# --- nfs-mount (worker) --------------------------------------------------------


def test_nfs_mount_runs_mount_a_for_nfs_when_something_is_missing(host, paths, monkeypatch, capsys):
    paths.api_config.write_text(json.dumps({"NFS_MOUNTPOINT_LIST": ["/home", "/export"]}))
    mounted = {"/home": True, "/export": False}
    monkeypatch.setattr(cli, "nfs_mount_states", lambda mountpoints: {m: mounted[m] for m in mountpoints})
    host.fail("mount", "-a", returncode=32)  # the states below still decide the answer

    assert run_cli(paths, "--json", "nfs-mount") == 1

    assert host.argvs == [["mount", "-a", "-t", "nfs,nfs4"]]
    assert json_output(capsys) == {"changed": True, "nfs_state": "unmounted", "mountpoints": mounted}


def test_nfs_mount_when_everything_is_mounted_runs_nothing(host, paths, monkeypatch):
    paths.api_config.write_text(json.dumps({"NFS_MOUNTPOINT_LIST": ["/home"]}))
    monkeypatch.setattr(cli, "nfs_mount_states", lambda mountpoints: {m: True for m in mountpoints})

    assert run_cli(paths, "nfs-mount") == 0
    assert host.calls == []


def test_nfs_mount_waits_for_the_open_and_close_lock(host, paths, monkeypatch, capsys):
    """One root-side operation at a time: a remount never races an open, close or another remount."""
    import fcntl

    paths.api_config.write_text(json.dumps({"NFS_MOUNTPOINT_LIST": ["/home"]}))
    monkeypatch.setattr(cli, "nfs_mount_states", lambda mountpoints: {m: False for m in mountpoints})
    monkeypatch.setattr(cli, "LOCK_WAIT", 0.3)
    with open(paths.lock_file, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)

        assert run_cli(paths, "--json", "nfs-mount") == 6

    assert host.calls == []
    assert "still running" in json_output(capsys)["error"]


# --- audit -------------------------------------------------------------------


def test_open_writes_one_audit_line_without_the_passphrase(host, paths, capsys, monkeypatch):
    monkeypatch.setattr(audit, "SYSLOG_SOCKET", str(paths.volume_ini.parent / "no-syslog-here"))
    monkeypatch.setenv("SUDO_UID", "997")

    assert run_cli(paths, "open", stdin=b"secret passphrase\n") == 0

    [line] = [json.loads(text) for text in capsys.readouterr().err.splitlines() if text.startswith('{"audit"')]
    assert (line["action"], line["outcome"], line["status"], line["client"]) == ("open", "ok", 0, "uid 997")
    assert "secret passphrase" not in json.dumps(line)


def test_status_writes_no_audit_line(host, paths, capsys, monkeypatch):
    monkeypatch.setattr(audit, "SYSLOG_SOCKET", str(paths.volume_ini.parent / "no-syslog-here"))

    run_cli(paths, "status")

    assert '{"audit"' not in capsys.readouterr().err


def test_an_unexpected_exception_still_answers_json_with_exit_4(host, paths, capsys, monkeypatch):
    def broken(*args):
        raise RuntimeError("something nobody planned for")

    monkeypatch.setattr(volume, "open_volume", broken)

    assert run_cli(paths, "--json", "open", stdin=b"pass\n") == 4

    report = json_output(capsys)
    assert report["volume_state"] == "unmounted" and "RuntimeError" in report["error"]
