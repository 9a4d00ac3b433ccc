"""volume.py: decide, then do. Exact argv and stdin at the runner seam; state from a fake kernel."""

from __future__ import annotations

import pytest

from luksctl.errors import CommandFailed, DeviceNotFound, LuksctlError, VolumeBusy, WrongPassphrase
from luksctl.root import volume

DEVICE = "/dev/disk/by-uuid/0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10"
PASSPHRASE = b"correct horse \\ battery \xc3\xbc"
OPTIONS = "nosuid,nodev"


def luks_open_argv():
    return ["cryptsetup", "open", DEVICE, "xkqzbmwe", "--key-file=-"]


def passphrase_check_argv():
    return ["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-file=-", DEVICE]


def mount_argv(vol):
    return ["mount", "-t", "ext4", "-o", OPTIONS, "/dev/mapper/xkqzbmwe", vol.mountpoint]


def test_open_maps_with_passphrase_on_stdin_then_mounts(host, vol):
    outcome = volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [luks_open_argv(), mount_argv(vol)]
    assert host.stdin_of("cryptsetup", "open") == PASSPHRASE
    assert host.stdin_of("mount") is None
    assert outcome.changed and outcome.status.mounted


def test_passphrase_never_appears_in_argv(host, vol):
    volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert all(PASSPHRASE.decode() not in arg for argv in host.argvs for arg in argv)


def test_open_creates_a_missing_mountpoint(host, vol):
    volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert volume.os.path.isdir(vol.mountpoint)


def test_open_when_already_mounted_runs_nothing(host, vol):
    host.mapper_open = host.mounted = True

    outcome = volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.calls == []
    assert not outcome.changed and outcome.status.mounted


def test_open_when_mapped_but_not_mounted_checks_the_passphrase_then_only_mounts(host, vol):
    host.mapper_open = True

    outcome = volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [passphrase_check_argv(), mount_argv(vol)]
    assert host.stdin_of("cryptsetup", "open", "--test-passphrase") == PASSPHRASE
    assert outcome.changed and outcome.status.mounted


def test_mapped_but_not_mounted_with_a_wrong_passphrase_mounts_nothing_and_keeps_the_mapping(host, vol):
    host.mapper_open = True
    host.fail("cryptsetup", "open", "--test-passphrase", returncode=2, stderr="No key available with this passphrase.\n")

    with pytest.raises(WrongPassphrase) as caught:
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [passphrase_check_argv()]  # no mount, and no close of a mapping we did not make
    assert host.mapper_open and not host.mounted
    assert "stays mapped" in caught.value.message
    assert PASSPHRASE.decode() not in caught.value.message


def test_mount_uses_the_configured_options(host, vol):
    volume.open_volume(vol, PASSPHRASE, "defaults")

    assert host.argvs[-1] == ["mount", "-t", "ext4", "-o", "defaults", "/dev/mapper/xkqzbmwe", vol.mountpoint]


def test_wrong_passphrase_raises_and_does_not_mount(host, vol):
    host.fail("cryptsetup", "open", returncode=2, stderr="No key available with this passphrase.\n")

    with pytest.raises(WrongPassphrase) as caught:
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [luks_open_argv()]
    assert PASSPHRASE.decode() not in caught.value.message


def test_other_cryptsetup_failure_is_command_failed_with_context(host, vol):
    host.fail("cryptsetup", "open", returncode=1, stderr="Device xkqzbmwe already exists.\n")

    with pytest.raises(CommandFailed) as caught:
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert not isinstance(caught.value, WrongPassphrase)
    assert caught.value.returncode == 1
    assert caught.value.argv == luks_open_argv()
    assert "already exists" in caught.value.stderr
    assert host.argvs == [luks_open_argv()]


def test_missing_luks_device_raises_before_running_anything(host, vol, monkeypatch):
    monkeypatch.setattr(volume.os.path, "exists", lambda path: False)

    with pytest.raises(DeviceNotFound) as caught:
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert DEVICE in caught.value.message
    assert host.calls == []


def test_mount_failure_after_our_luks_open_closes_the_mapper_again(host, vol):
    host.fail("mount", returncode=32, stderr="mount: wrong fs type, bad option, bad superblock\n")

    with pytest.raises(CommandFailed):
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [luks_open_argv(), mount_argv(vol), ["cryptsetup", "close", "xkqzbmwe"]]
    assert not host.mapper_open


def test_mount_failure_keeps_a_mapper_that_was_open_before(host, vol):
    host.mapper_open = True
    host.fail("mount", returncode=32, stderr="mount: wrong fs type\n")

    with pytest.raises(CommandFailed):
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [passphrase_check_argv(), mount_argv(vol)]
    assert host.mapper_open


def test_mount_error_wins_when_the_cleanup_close_also_fails(host, vol):
    host.fail("mount", returncode=32, stderr="mount: wrong fs type\n")
    host.fail("cryptsetup", "close", returncode=5, stderr="Device is still in use\n")

    with pytest.raises(CommandFailed) as caught:
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert caught.value.argv == mount_argv(vol)


def test_cryptsetup_killed_after_mapping_leaves_nothing_open(host, vol, monkeypatch):
    """cryptsetup can die (OOM, our timeout) after the kernel made the mapping."""
    real_run = host.run

    def killed_after_mapping(argv, **kwargs):
        if argv[:2] == ["cryptsetup", "open"]:
            host.calls.append((list(argv), kwargs.get("stdin")))
            host.mapper_open = True
            raise CommandFailed("cryptsetup did not finish within 150 s", list(argv), None, "")
        return real_run(argv, **kwargs)

    monkeypatch.setattr(volume.runner, "run", killed_after_mapping)

    with pytest.raises(CommandFailed):
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [luks_open_argv(), ["cryptsetup", "close", "xkqzbmwe"]]
    assert not host.mapper_open


def test_a_mountpoint_that_is_a_file_is_a_clear_error_and_closes_the_mapper(host, vol):
    with open(vol.mountpoint, "w"):
        pass

    with pytest.raises(LuksctlError, match="not a directory"):
        volume.open_volume(vol, PASSPHRASE, OPTIONS)

    assert host.argvs == [luks_open_argv(), ["cryptsetup", "close", "xkqzbmwe"]]
    assert not host.mapper_open


def test_close_unmounts_then_closes(host, vol):
    host.mapper_open = host.mounted = True

    outcome = volume.close_volume(vol)

    assert host.argvs == [["umount", vol.mountpoint], ["cryptsetup", "close", "xkqzbmwe"]]
    assert all(stdin in (None, b"") for _, stdin in host.calls)
    assert outcome.changed and not outcome.status.mapper_open


def test_close_when_mapped_but_not_mounted_only_closes(host, vol):
    host.mapper_open = True

    volume.close_volume(vol)

    assert host.argvs == [["cryptsetup", "close", "xkqzbmwe"]]


def test_close_busy_filesystem_raises_volume_busy_and_keeps_the_mapper(host, vol):
    host.mapper_open = host.mounted = True
    host.fail("umount", returncode=32, stderr=f"umount: {vol.mountpoint}: target is busy.\n")

    with pytest.raises(VolumeBusy) as caught:
        volume.close_volume(vol)

    assert host.argvs == [["umount", vol.mountpoint]]
    assert vol.mountpoint in caught.value.message


def test_close_other_umount_failure_is_command_failed_and_keeps_the_mapper(host, vol):
    host.mapper_open = host.mounted = True
    host.fail("umount", returncode=32, stderr="umount: something else went wrong\n")

    with pytest.raises(CommandFailed) as caught:
        volume.close_volume(vol)

    assert not isinstance(caught.value, VolumeBusy)
    assert host.argvs == [["umount", vol.mountpoint]]


def test_cryptsetup_close_busy_raises_volume_busy(host, vol):
    host.mapper_open = True
    host.fail("cryptsetup", "close", returncode=5, stderr="Device xkqzbmwe is still in use.\n")

    with pytest.raises(VolumeBusy):
        volume.close_volume(vol)


def test_close_when_already_closed_runs_nothing(host, vol):
    outcome = volume.close_volume(vol)

    assert host.calls == []
    assert not outcome.changed and not outcome.status.mapper_open


def test_current_status_reads_the_configured_device_and_mountpoint(vol, monkeypatch):
    seen = []
    monkeypatch.setattr(volume, "volume_status", lambda cryptdev, mountpoint: seen.append((cryptdev, mountpoint)) or "status")

    assert volume.current_status(vol) == "status"
    assert seen == [("xkqzbmwe", vol.mountpoint)]
