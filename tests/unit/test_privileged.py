"""privileged.py: SudoBridge's exact argv and stdin, and exit code -> error class."""

from __future__ import annotations

import json

import pytest

from luksctl import runner
from luksctl.api.privileged import SudoBridge
from luksctl.errors import (
    ActionFailed,
    CommandFailed,
    ConfigError,
    LockTimeout,
    LuksctlError,
    PrivilegedCallFailed,
    VolumeBusy,
    WrongPassphrase,
)

PASSPHRASE = "pa ss \\ ü'\"$(reboot)"
LUKSCTL = "/usr/local/sbin/luksctl"


class FakeSudo:
    """runner.run standing in for `sudo -n luksctl --json ...`: answers one scripted result."""

    def __init__(self, returncode: int = 0, report: dict | None = None, stdout: str | None = None, stderr: str = ""):
        self.returncode = returncode
        self.stdout = stdout if stdout is not None else json.dumps(report if report is not None else {"volume_state": "mounted"})
        self.stderr = stderr
        self.calls: list[tuple[list[str], bytes | None, float]] = []

    def __call__(self, argv, *, timeout, stdin=None, check=True):
        self.calls.append((list(argv), stdin, timeout))
        assert check is False, "the bridge reads the report even on failure"
        return runner.Result(list(argv), self.returncode, self.stdout, self.stderr)


@pytest.fixture
def bridge() -> SudoBridge:
    return SudoBridge(LUKSCTL, timeout=180)


def install(monkeypatch, fake: FakeSudo) -> FakeSudo:
    monkeypatch.setattr(runner, "run", fake)
    return fake


def test_open_argv_and_stdin(bridge, monkeypatch):
    sudo = install(monkeypatch, FakeSudo(report={"volume_state": "mounted", "changed": True}))

    report = bridge.open_volume(PASSPHRASE)

    assert sudo.calls == [(["/usr/bin/sudo", "-n", LUKSCTL, "--json", "open"], PASSPHRASE.encode() + b"\n", 180)]
    assert report == {"volume_state": "mounted", "changed": True}


def test_nfs_mount_argv_and_empty_stdin(bridge, monkeypatch):
    sudo = install(monkeypatch, FakeSudo(report={"nfs_state": "mounted"}))

    assert bridge.nfs_mount() == {"nfs_state": "mounted"}
    assert sudo.calls == [(["/usr/bin/sudo", "-n", LUKSCTL, "--json", "nfs-mount"], b"", 180)]


def test_nfs_mount_exit_1_returns_the_report(bridge, monkeypatch):
    report = {"nfs_state": "unmounted", "mountpoints": {"/home": True, "/export": False}, "changed": True}
    install(monkeypatch, FakeSudo(returncode=1, report=report))

    assert bridge.nfs_mount() == report


@pytest.mark.parametrize(
    "returncode, error_class",
    [(2, WrongPassphrase), (3, ConfigError), (5, ActionFailed), (6, LockTimeout), (1, VolumeBusy)],
)
def test_exit_code_selects_the_error_class(bridge, monkeypatch, returncode, error_class):
    install(monkeypatch, FakeSudo(returncode=returncode, report={"volume_state": "unmounted", "error": "what luksctl said"}))

    with pytest.raises(error_class) as caught:
        bridge.open_volume(PASSPHRASE)

    assert caught.value.message == "what luksctl said"


def test_other_exit_code_is_a_plain_luksctl_error(bridge, monkeypatch):
    install(monkeypatch, FakeSudo(returncode=4, report={"volume_state": "unmounted"}))

    with pytest.raises(LuksctlError) as caught:
        bridge.open_volume(PASSPHRASE)

    assert type(caught.value) is LuksctlError
    assert "exit code 4" in caught.value.message


@pytest.mark.parametrize(
    "stdout, stderr",
    [
        ("", "sudo: a password is required\n"),
        ("", f"sudo: sorry, you are not allowed to run {LUKSCTL} --json open {PASSPHRASE}\n"),
        ("[1, 2]", ""),
        (f"Traceback ... {PASSPHRASE}", ""),
    ],
)
def test_no_json_report_is_privileged_call_failed_without_the_passphrase(bridge, monkeypatch, stdout, stderr):
    install(monkeypatch, FakeSudo(returncode=1, stdout=stdout, stderr=stderr))

    with pytest.raises(PrivilegedCallFailed) as caught:
        bridge.open_volume(PASSPHRASE)

    assert PASSPHRASE not in str(caught.value)
    assert "sudoers" in caught.value.message


def test_sudo_that_cannot_start_is_privileged_call_failed(bridge, monkeypatch):
    def missing_sudo(argv, **kwargs):
        raise CommandFailed("/usr/bin/sudo could not be started: No such file or directory", argv, None, "")

    monkeypatch.setattr(runner, "run", missing_sudo)

    with pytest.raises(PrivilegedCallFailed) as caught:
        bridge.open_volume(PASSPHRASE)

    assert PASSPHRASE not in caught.value.message
