"""header, recovery-key and report through `luksctl`'s main(), on real LUKS headers
in image files (tests/luks_lab.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lock_holder import lock_held_elsewhere, lock_is_free
from luks_lab import LUKS_LAB_FAST_NEW_SLOT as FAST_NEW_SLOT
from luks_lab import LUKS_LAB_PASSPHRASE as PASSPHRASE
from luks_lab import Lab

from luksctl import secret_input
from luksctl.config import VolumeConfig, load_volume_config
from luksctl.errors import EXIT_COMMAND_FAILED, EXIT_OK, EXIT_REFUSED, EXIT_STALE_BACKUP, EXIT_USAGE, EXIT_WRONG_PASSPHRASE, Refused, VaultDenied
from luksctl.root import blockdev, cli, cryptsetup, header, keys, pending, report, rotate
from luksctl.root.cli import main
from luksctl.root.decommission import decommission
from luksctl.secret_input import read_passphrase
from luksctl.vault import SecretRef, StoredSecret

opens = Lab.opens
luks_format = Lab.format


def test_the_header_backup_is_at_fast_luks_default_path_unless_the_ini_names_one():
    """PROTOCOL §7: an ini without header_path (fast-luks wrote none) means /etc/luks/luks-header.bck."""
    assert header.backup_path(None) == Path("/etc/luks/luks-header.bck")
    assert header.backup_path("/srv/luks/volume.bck") == Path("/srv/luks/volume.bck")


def test_header_backup_is_0600_with_its_checksum_recorded(lab, capsys):
    code, answer = lab.run(capsys, "header", "backup")

    assert code == EXIT_OK and answer["changed"] is True
    assert stat.S_IMODE(lab.backup.stat().st_mode) == 0o600
    digest = hashlib.sha256(lab.backup.read_bytes()).hexdigest()
    assert answer["header_checksum"] == digest
    assert (lab.dir / "luks-header.bck.sha256").read_text() == f"{digest}  luks-header.bck\n"
    assert stat.S_IMODE((lab.dir / "luks-header.bck.sha256").stat().st_mode) == 0o600


def test_header_backup_leaves_no_scratch_files(lab, capsys):
    lab.run(capsys, "header", "backup")
    lab.run(capsys, "header", "backup")  # over an existing backup (cryptsetup itself refuses to)

    assert sorted(p.name for p in lab.dir.iterdir()) == ["disk.img", "lock", "luks-cryptdev.ini", "luks-header.bck", "luks-header.bck.sha256"]


def test_header_verify_matches_a_fresh_backup(lab, capsys):
    lab.run(capsys, "header", "backup")

    code, answer = lab.run(capsys, "header", "verify")

    assert code == EXIT_OK
    check = answer["header_backup"]
    assert check["matches"] is True and check["intact"] is True and check["keyslots_current"] is True and check["same_volume"] is True
    assert check["path"] == str(lab.backup)


def test_header_verify_gives_the_backups_age(lab, capsys):
    lab.run(capsys, "header", "backup")
    an_hour_ago = time.time() - 3600
    os.utime(lab.backup, (an_hour_ago, an_hour_ago))

    code, answer = lab.run(capsys, "header", "verify")

    assert code == EXIT_OK and 3600 <= answer["header_backup"]["age_seconds"] < 3660


def test_header_verify_of_a_backup_with_no_checksum_recorded_matches_and_leaves_intact_unknown(lab, capsys):
    """A backup made by `cryptsetup luksHeaderBackup` alone has no `.sha256`: nothing says it is damaged."""
    subprocess.run(["cryptsetup", "luksHeaderBackup", str(lab.image), "--header-backup-file", str(lab.backup)], check=True, capture_output=True)

    code, answer = lab.run(capsys, "header", "verify")

    assert code == EXIT_OK and answer["header_backup"]["matches"] is True and "intact" not in answer["header_backup"]


def test_header_verify_without_a_backup_exits_8(lab, capsys):
    code, answer = lab.run(capsys, "header", "verify")

    assert code == EXIT_STALE_BACKUP
    assert answer["header_backup"]["exists"] is False


def test_header_verify_sees_a_keyslot_change_and_a_damaged_backup(lab, capsys):
    lab.run(capsys, "header", "backup")
    subprocess.run(["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(PASSPHRASE)}", *FAST_NEW_SLOT, str(lab.image)],
                   input=PASSPHRASE + b"another\n", check=True, capture_output=True)

    code, answer = lab.run(capsys, "header", "verify")
    assert code == EXIT_STALE_BACKUP
    assert answer["header_backup"]["matches"] is False and answer["header_backup"]["keyslots_current"] is False

    lab.run(capsys, "header", "backup")
    with lab.backup.open("r+b") as backup:  # one flipped byte deep in the keyslot area
        backup.seek(1024 * 1024)
        byte = backup.read(1)
        backup.seek(1024 * 1024)
        backup.write(bytes([byte[0] ^ 1]))
    code, answer = lab.run(capsys, "header", "verify")
    assert code == EXIT_STALE_BACKUP
    assert answer["header_backup"]["intact"] is False


def test_header_restore_brings_back_a_removed_keyslot(lab, capsys):
    lab.run(capsys, "header", "backup")
    subprocess.run(["cryptsetup", "luksErase", "--batch-mode", str(lab.image)], check=True, capture_output=True)
    assert not opens(lab.image, PASSPHRASE)

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_OK and answer["restored_from"] == str(lab.backup)
    assert opens(lab.image, PASSPHRASE)


def test_header_restore_without_yes_on_a_pipe_refuses(lab, capsys):
    lab.run(capsys, "header", "backup")
    before = hashlib.sha256(lab.image.read_bytes()).hexdigest()

    code, answer = lab.run(capsys, "header", "restore")

    assert code == EXIT_REFUSED and "--yes" in answer["error"]
    assert hashlib.sha256(lab.image.read_bytes()).hexdigest() == before


def test_header_restore_refuses_a_backup_of_another_volume(lab, tmp_path, capsys):
    other = tmp_path / "other.img"
    luks_format(other, b"other volume")
    header.write_backup(str(other), lab.backup)  # with its checksum: only the uuid tells it apart
    before = hashlib.sha256(lab.image.read_bytes()).hexdigest()

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_REFUSED
    assert "not of this volume" in answer["error"] and lab.uuid in answer["error"]
    assert hashlib.sha256(lab.image.read_bytes()).hexdigest() == before


def test_header_restore_refuses_a_backup_that_changed_since_it_was_written(lab, capsys):
    lab.run(capsys, "header", "backup")
    (lab.dir / "luks-header.bck.sha256").write_text("0" * 64 + "  luks-header.bck\n")

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_REFUSED and "damaged or was replaced" in answer["error"]


def untrusted(lab, what: str) -> None:
    """Make the backup, its checksum or their directory something root must not restore from."""
    checksum = lab.dir / "luks-header.bck.sha256"
    match what:
        case "no checksum":
            checksum.unlink()
        case "an empty checksum":
            checksum.write_text("")
        case "backup group-writable":
            lab.backup.chmod(0o620)
        case "checksum other-writable":
            checksum.chmod(0o602)
        case "directory group-writable":
            lab.dir.chmod(0o770)
        case "backup not root's":
            os.chown(lab.backup, 1000, 1000)
        case "backup a symlink":
            lab.backup.rename(lab.dir / "elsewhere.bck")
            lab.backup.symlink_to(lab.dir / "elsewhere.bck")


REFUSAL = {"no checksum": "luks-header.bck.sha256 does not exist", "an empty checksum": "records no checksum",
           "directory group-writable": f"must be a directory owned by root and not writable by group or others (uid {os.geteuid()}, mode 770)"}


@pytest.mark.parametrize("what", ["no checksum", "an empty checksum", "backup group-writable", "checksum other-writable", "directory group-writable",
                                  "backup not root's", "backup a symlink"])
def test_header_restore_refuses_a_backup_anyone_but_root_could_have_written(lab, capsys, what):
    lab.run(capsys, "header", "backup")
    subprocess.run(["cryptsetup", "luksErase", "--batch-mode", str(lab.image)], check=True, capture_output=True)
    before = hashlib.sha256(lab.image.read_bytes()).hexdigest()
    untrusted(lab, what)

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    expected = REFUSAL.get(what, "must be a regular file owned by root and not writable by group or others")
    assert code == EXIT_REFUSED and expected in answer["error"], answer
    assert hashlib.sha256(lab.image.read_bytes()).hexdigest() == before


def test_header_restore_restores_the_private_copy_it_checked_not_the_file(lab, capsys, monkeypatch):
    """A backup swapped between the last check and luksHeaderRestore is not what gets written."""
    lab.run(capsys, "header", "backup")
    subprocess.run(["cryptsetup", "luksErase", "--batch-mode", str(lab.image)], check=True, capture_output=True)
    restore = cryptsetup.restore_header
    restored_from = []

    def swapped_just_before(device, backup):
        lab.backup.write_bytes(bytes(lab.backup.stat().st_size))  # replaced by zeros at the last moment
        restored_from.append(backup)
        restore(device, backup)

    monkeypatch.setattr(cryptsetup, "restore_header", swapped_just_before)
    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_OK and opens(lab.image, PASSPHRASE)
    (copy,) = restored_from
    assert copy != lab.backup and copy.parent.name.startswith(header.SCRATCH_PREFIX) and not copy.exists()


def test_header_restore_warns_when_the_backups_keyslots_differ_from_the_devices(lab, capsys):
    lab.run(capsys, "header", "backup")
    code, answer = lab.run(capsys, "header", "restore", "--yes")
    assert code == EXIT_OK and "warnings" not in answer  # the same keyslots

    subprocess.run(["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(PASSPHRASE)}", *FAST_NEW_SLOT, str(lab.image)],
                   input=PASSPHRASE + b"added since the backup", check=True, capture_output=True)
    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_OK
    assert answer["warnings"] == [f"the keyslots of {lab.backup} differ from the device's: restoring it brings back every passphrase "
                                  "its keyslots held (one rotated out since opens the volume again) and drops any added since"]


def destroy_header(image) -> None:
    """Zero both LUKS2 header copies (the first 32 KiB): cryptsetup no longer sees a LUKS device."""
    with image.open("r+b") as disk:
        disk.write(bytes(32 * 1024))
    assert subprocess.run(["cryptsetup", "isLuks", str(image)]).returncode != 0


def uuid_link_gone(lab, monkeypatch) -> None:
    """As udev does when the header goes: the by-uuid link disappears; the ini still names the device."""
    monkeypatch.setattr(VolumeConfig, "device_path", property(lambda self: str(lab.dir / "by-uuid" / self.uuid)))
    with lab.ini.open("a") as ini:
        ini.write(f"device = {lab.image}\n")


def test_header_verify_and_report_on_a_destroyed_header(lab, capsys, monkeypatch):
    lab.run(capsys, "header", "backup")
    destroy_header(lab.image)
    uuid_link_gone(lab, monkeypatch)

    code, answer = lab.run(capsys, "header", "verify")
    assert code == EXIT_STALE_BACKUP
    check = answer["header_backup"]  # what to restore from: the backup is there and intact
    assert check["device_header_missing"] is True and check["matches"] is False
    assert check["exists"] is True and check["intact"] is True and check["age_seconds"] >= 0 and check["path"] == str(lab.backup)

    code, answer = lab.run(capsys, "report")
    assert code == EXIT_OK and answer["device_present"] is True and answer["device_header_missing"] is True
    assert answer["device"] == str(lab.image)
    assert "LUKS:             NO HEADER on the device (destroyed or overwritten): luksctl header restore" in report.report_lines(answer)


def test_header_restore_of_a_destroyed_header_finds_the_device_by_the_ini(lab, capsys, monkeypatch):
    lab.run(capsys, "header", "backup")
    destroy_header(lab.image)
    uuid_link_gone(lab, monkeypatch)

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_OK, answer
    assert opens(lab.image, PASSPHRASE)
    assert lab.run(capsys, "header", "verify")[0] == EXIT_OK


def test_header_commands_do_not_take_another_volume_at_the_inis_device_path_for_this_one(lab, capsys, monkeypatch):
    lab.run(capsys, "header", "backup")
    uuid_link_gone(lab, monkeypatch)
    lab.image.unlink()
    other_uuid = luks_format(lab.image, b"another volume")  # the disks were renamed: the ini's device is another volume now

    for command in (["header", "verify"], ["header", "restore", "--yes"]):
        code, answer = lab.run(capsys, *command)
        assert code == EXIT_COMMAND_FAILED and "holds another volume" in answer["error"], command
    code, answer = lab.run(capsys, "report")
    assert answer["device_present"] is False and "keyslots" not in answer
    assert subprocess.run(["cryptsetup", "luksUUID", str(lab.image)], capture_output=True, text=True).stdout.strip() == other_uuid


def test_header_commands_when_neither_the_uuid_nor_the_inis_device_is_there(lab, capsys, monkeypatch):
    uuid_link_gone(lab, monkeypatch)
    lab.image.unlink()

    code, answer = lab.run(capsys, "header", "verify")

    assert code == EXIT_COMMAND_FAILED and f"nor {lab.image} (the ini's device) is attached" in answer["error"]


def test_header_restore_of_a_destroyed_header_on_the_device_given(lab, capsys, monkeypatch):
    lab.run(capsys, "header", "backup")
    destroy_header(lab.image)
    monkeypatch.setattr(VolumeConfig, "device_path", property(lambda self: str(lab.dir / "by-uuid" / self.uuid)))  # no device in the ini

    assert lab.run(capsys, "header", "verify", "--device", str(lab.image))[0] == EXIT_STALE_BACKUP
    code, answer = lab.run(capsys, "header", "restore", "--yes", "--device", str(lab.image))

    assert code == EXIT_OK, answer
    assert opens(lab.image, PASSPHRASE)
    code, answer = lab.run(capsys, "header", "verify", "--device", str(lab.dir / "nothing"))
    assert code == EXIT_COMMAND_FAILED and "nothing (given with --device) is attached" in answer["error"]


def test_header_restore_refuses_a_device_smaller_than_the_backup(lab, capsys, monkeypatch):
    lab.run(capsys, "header", "backup")
    uuid_link_gone(lab, monkeypatch)
    lab.image.unlink()
    with lab.image.open("xb") as small:  # another, smaller disk now has the ini's device name
        small.truncate(1024 * 1024)

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_REFUSED and "smaller than the header" in answer["error"]
    assert lab.image.read_bytes() == bytes(1024 * 1024)


def test_header_restore_onto_a_device_exactly_the_size_of_the_backup(lab, capsys, monkeypatch):
    """"Not smaller than the backup": a device holding nothing but the header is still that volume's."""
    lab.run(capsys, "header", "backup")
    uuid_link_gone(lab, monkeypatch)
    lab.image.unlink()
    with lab.image.open("xb") as exact:
        exact.truncate(lab.backup.stat().st_size)

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_OK, answer
    assert opens(lab.image, PASSPHRASE)


def as_block_device(monkeypatch, lab, users: list[str], found: list[str]) -> list:
    """The lab's image stands in for /dev/vdb (254:16), with these users and signatures; returns
    what blockdev was asked: ("users", device, allowed_holder) and ("signatures", device)."""
    monkeypatch.setattr(header.stat, "S_ISBLK", lambda mode: True)
    vdb = blockdev.BlockDevice(str(lab.image), "254:16")
    monkeypatch.setattr(blockdev, "block_device", lambda path: vdb if path == vdb.path else None)
    asked = []
    monkeypatch.setattr(blockdev, "users", lambda device, allowed_holder=None: asked.append(("users", device, allowed_holder)) or users)
    monkeypatch.setattr(blockdev, "signatures", lambda device: asked.append(("signatures", device)) or found)
    return asked


@pytest.mark.parametrize("users, found, refusal", [
    (["partition vdb1 is mounted on /mnt", "held by dm-3"], [], "is in use: partition vdb1 is mounted on /mnt; held by dm-3; nothing"),
    ([], ["signature crypto_LUKS", "signature ext4", "partition table gpt"], "holds signature ext4, partition table gpt, not only a LUKS header"),
])
def test_header_restore_on_a_block_device_refuses_one_in_use_or_holding_another_signature(lab, capsys, monkeypatch, users, found, refusal):
    lab.run(capsys, "header", "backup")
    destroy_header(lab.image)
    before = lab.image.read_bytes()
    asked = as_block_device(monkeypatch, lab, users, found)

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_REFUSED and refusal in answer["error"]
    vdb = blockdev.BlockDevice(str(lab.image), "254:16")
    assert asked[0] == ("users", vdb, "labvol"), "the volume's own mapper may stay open on it"
    assert asked[1:] == ([] if users else [("signatures", vdb)])
    assert lab.image.read_bytes() == before


def test_header_restore_on_a_block_device_holding_only_its_luks_header(lab, capsys, monkeypatch):
    """The usual case of a damaged keyslot area: blkid still sees the LUKS signature, nothing else."""
    lab.run(capsys, "header", "backup")
    subprocess.run(["cryptsetup", "luksErase", "--batch-mode", str(lab.image)], check=True, capture_output=True)
    asked = as_block_device(monkeypatch, lab, [], ["signature crypto_LUKS"])

    code, answer = lab.run(capsys, "header", "restore", "--yes")

    assert code == EXIT_OK, answer
    assert opens(lab.image, PASSPHRASE)
    vdb = blockdev.BlockDevice(str(lab.image), "254:16")
    assert asked == [("users", vdb, "labvol"), ("signatures", vdb)] * 2  # checked again once the lock is held


def test_recovery_key_add_opens_its_own_slot_and_refreshes_the_backup(lab, capsys):
    lab.run(capsys, "header", "backup")
    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE + b"\n")

    assert code == EXIT_OK
    key = answer["recovery_key"].encode()
    assert len(key) == 8 * 6 + 7
    assert answer["recovery_slot"] == 1
    assert opens(lab.image, key) and opens(lab.image, PASSPHRASE)
    assert opens(lab.backup, key), "the backup must hold the recovery keyslot too"

    code, answer = lab.run(capsys, "report")
    assert [slot["recovery_key"] for slot in answer["keyslots"]] == [False, True]


def test_recovery_key_add_to_a_file_refuses_to_overwrite(lab, capsys):
    target = lab.dir / "recovery.key"
    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, "--output", str(target), stdin=PASSPHRASE)

    assert code == EXIT_OK and "recovery_key" not in answer
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert opens(lab.image, target.read_bytes().rstrip(b"\n"))

    lab.run(capsys, "recovery-key", "remove", stdin=PASSPHRASE)
    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, "--output", str(target), stdin=PASSPHRASE)
    assert code == EXIT_REFUSED and "already exists" in answer["error"]


def test_recovery_key_add_to_a_file_that_cannot_be_made_says_why_and_adds_no_keyslot(lab, capsys):
    target = lab.dir / "no-such-directory" / "recovery.key"

    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, "--output", str(target), stdin=PASSPHRASE)

    assert code == EXIT_REFUSED and answer["error"] == f"cannot create {target}: No such file or directory"
    assert not cryptsetup.read_header(str(lab.image)).recovery_slots, "the file comes before the keyslot"


def test_recovery_key_file_holds_exactly_the_key_and_works_with_cryptsetups_key_file(lab, capsys, monkeypatch):
    key = b"abcdef-ghjkmn-pqrstu-vwxyz2-345678-9abcde-fghjkm-npqrst"
    monkeypatch.setattr(keys, "new_recovery_key", lambda: key)
    target = lab.dir / "recovery.key"

    code, _ = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, "--output", str(target), stdin=PASSPHRASE)

    assert code == EXIT_OK
    assert target.read_bytes() == key  # no newline: `--key-file FILE` would take it as part of the key
    opened = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", str(target), str(lab.image)], capture_output=True)
    assert opened.returncode == 0, opened.stderr
    assert read_passphrase(target.open("rb"), is_tty=False) == key  # and `luksctl open < recovery.key` still reads it whole


def test_recovery_key_add_with_a_wrong_passphrase_changes_nothing(lab, capsys):
    before = hashlib.sha256(lab.image.read_bytes()).hexdigest()

    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=b"wrong")

    assert code == EXIT_WRONG_PASSPHRASE
    assert answer["error"] == f"the passphrase given does not open {lab.image}; nothing was changed"
    assert hashlib.sha256(lab.image.read_bytes()).hexdigest() == before


def test_recovery_key_add_stops_if_the_new_key_does_not_open_its_slot(lab, capsys, monkeypatch):
    """The check after luksAddKey, made to fail at the cryptsetup seam: a key cryptsetup added but
    that does not open its slot is never labelled nor shown."""
    real = keys.opening_slot
    monkeypatch.setattr(keys, "opening_slot", lambda device, passphrase, slot=None: None if slot is not None else real(device, passphrase))

    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)

    assert code == EXIT_COMMAND_FAILED and "recovery_key" not in answer
    assert answer["error"].startswith(f"the new recovery key does not open keyslot 1 of {lab.image}")
    assert not cryptsetup.read_header(str(lab.image)).recovery_tokens


def test_a_second_recovery_key_is_refused(lab, capsys):
    lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)

    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)

    assert code == EXIT_REFUSED and "already has a recovery key" in answer["error"]


def test_recovery_key_remove_kills_its_slot_and_the_backups_copy(lab, capsys):
    _, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)
    key = answer["recovery_key"].encode()

    code, answer = lab.run(capsys, "recovery-key", "remove", stdin=PASSPHRASE)

    assert code == EXIT_OK and answer["removed_slots"] == [1]
    assert not opens(lab.image, key) and opens(lab.image, PASSPHRASE)
    assert not opens(lab.backup, key), "a backup that still opens with the removed key must not survive"


def test_recovery_key_remove_refuses_the_recovery_key_itself(lab, capsys):
    """Given only the recovery key, removing it would leave no slot a stored secret opens."""
    _, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)
    key = answer["recovery_key"].encode()

    code, answer = lab.run(capsys, "recovery-key", "remove", stdin=key)

    assert code == EXIT_REFUSED
    assert answer["error"] == "the passphrase given is the recovery key itself; give the stored passphrase, which must open another keyslot"
    assert opens(lab.image, key)


def test_recovery_key_remove_with_a_wrong_passphrase_says_so_and_keeps_the_key(lab, capsys):
    _, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)

    code, refused = lab.run(capsys, "recovery-key", "remove", stdin=b"wrong")

    assert code == EXIT_WRONG_PASSPHRASE
    assert refused["error"] == f"the passphrase given does not open {lab.image}; nothing was changed"
    assert opens(lab.image, answer["recovery_key"].encode())


def test_recovery_key_remove_without_one_changes_nothing(lab, capsys):
    code, answer = lab.run(capsys, "recovery-key", "remove", stdin=PASSPHRASE)

    assert code == EXIT_OK and answer["changed"] is False


def test_recovery_key_is_refused_on_luks1(tmp_path, monkeypatch, capsys):
    lab = Lab(tmp_path, monkeypatch, "luks1")

    code, answer = lab.run(capsys, "recovery-key", "add", stdin=PASSPHRASE)

    assert code == EXIT_REFUSED and "LUKS1" in answer["error"]


def test_report_describes_header_keyslots_and_backup(lab, capsys):
    lab.run(capsys, "header", "backup")

    code, answer = lab.run(capsys, "report", "--check-passphrase", stdin=PASSPHRASE)

    assert code == EXIT_OK
    assert answer["volume_state"] == "unmounted" and answer["mapper_open"] is False
    assert answer["luks_version"] == 2 and answer["uuid"] == lab.uuid
    assert answer["cipher"] == "aes-xts-plain64" and answer["key_size"] == 512
    assert answer["keyslots"] == [{"slot": 0, "pbkdf": "pbkdf2", "iterations": 1000, "recovery_key": False}]
    assert answer["header_backup"]["matches"] is True and answer["header_backup"]["age_seconds"] >= 0
    assert answer["passphrase_opens_slot"] == 0
    assert "last_open" in answer


def test_report_lists_the_keyslots_in_slot_order(lab, capsys):
    for slot in (5, 1):  # the header's JSON keeps them in the order they were added: 0, 5, 1
        subprocess.run(["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(PASSPHRASE)}", *FAST_NEW_SLOT, "--key-slot", str(slot),
                        str(lab.image)], input=PASSPHRASE + f"slot {slot}".encode(), check=True, capture_output=True)

    code, answer = lab.run(capsys, "report")

    assert code == EXIT_OK and [keyslot["slot"] for keyslot in answer["keyslots"]] == [0, 1, 5]


def test_report_on_luks1(tmp_path, monkeypatch, capsys):
    lab = Lab(tmp_path, monkeypatch, "luks1")

    code, answer = lab.run(capsys, "report")

    assert code == EXIT_OK
    assert answer["luks_version"] == 1 and answer["cipher"] == "aes-xts-plain64" and answer["key_size"] == 512
    assert answer["keyslots"] == [{"slot": 0, "pbkdf": "pbkdf2", "iterations": 1000, "recovery_key": False}]


def test_report_when_the_header_backups_directory_does_not_exist(lab, capsys):
    lab.ini.write_text(lab.ini.read_text().replace(str(lab.backup), str(lab.dir / "not-made-yet" / "luks-header.bck")))

    code, answer = lab.run(capsys, "report")

    assert code == EXIT_OK, answer
    assert answer["stale_header_copies"] == [] and answer["header_backup"]["exists"] is False


def test_report_text(lab, capsys):
    assert main(["report"], paths=lab.paths, stdin=io.BytesIO(b""), stdin_is_tty=False) == EXIT_OK
    out = capsys.readouterr().out

    assert "LUKS:             version 2, aes-xts-plain64, 512-bit key" in out
    assert "Keyslot 0:        pbkdf2 (iterations 1000)" in out
    assert f"Header backup:    {lab.backup} MISSING" in out


COPY_THEN_WAIT = """
import sys, time
from pathlib import Path
from luksctl.root import header
with header._private_dir(Path(sys.argv[2])) as scratch:
    header._copy_header(sys.argv[1], scratch / "header")
    print(scratch, flush=True)
    time.sleep(60)
"""


def killed_runs_scratch(lab) -> list:
    """Scratch directories SIGKILLed runs left: one of a run killed holding its header copy, one as older versions named them."""
    run = subprocess.Popen([sys.executable, "-c", COPY_THEN_WAIT, str(lab.image), str(lab.backup)], stdout=subprocess.PIPE, text=True)
    killed = Path(run.stdout.readline().strip())
    run.kill()
    run.wait()
    run.stdout.close()
    older = lab.dir / ".luksctl-q7_wz3tm"
    older.mkdir(mode=0o700)
    subprocess.run(["cryptsetup", "luksHeaderBackup", str(lab.image), "--header-backup-file", str(older / "header")], check=True)
    assert (killed / "header").is_file()
    # A run killed just before renaming the new backup (or its checksum) into place leaves its
    # temporary, named as durable.write_atomically names them: a whole header copy.
    backup_temporary = lab.backup.with_name(f".{lab.backup.name}.0123abcd.tmp")
    shutil.copyfile(older / "header", backup_temporary)
    checksum_temporary = lab.backup.with_name(f".{lab.backup.name}.sha256.89abcdef.tmp")
    checksum_temporary.write_text("0" * 64 + f"  {lab.backup.name}\n")
    return [killed, older, backup_temporary, checksum_temporary]


def test_header_copies_a_killed_run_left_are_listed_by_report_and_removed_by_the_next_backup(lab, capsys):
    left = killed_runs_scratch(lab)
    live = lab.dir / f".luksctl-{os.getpid()}-abcdefgh"  # a run still going keeps its own
    live.mkdir()
    unrelated = lab.dir / "keys.d"  # and /etc/luks's other contents are not luksctl's to remove
    unrelated.mkdir()

    code, answer = lab.run(capsys, "report")
    assert code == EXIT_OK and answer["stale_header_copies"] == sorted(str(path) for path in left)

    lab.run(capsys, "header", "backup")
    assert not any(path.exists() for path in left) and live.is_dir() and unrelated.is_dir()
    code, answer = lab.run(capsys, "report")
    assert answer["stale_header_copies"] == []


def test_header_backup_goes_on_when_another_run_removed_the_killed_runs_copies_first(lab, capsys, monkeypatch):
    """`header verify` and `report` take no lock and remove them too: both may find the same ones."""
    left = killed_runs_scratch(lab)
    find = header.stale_copies

    def removed_by_another_run_once_found(backup):
        found = find(backup)
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return found

    monkeypatch.setattr(header, "stale_copies", removed_by_another_run_once_found)
    code, answer = lab.run(capsys, "header", "backup")

    assert code == EXIT_OK, answer
    assert not any(path.exists() for path in left)


def test_decommission_removes_header_copies_a_killed_run_left(lab):
    left = killed_runs_scratch(lab)

    done = decommission(load_volume_config(lab.ini), lab.ini, None, None)

    assert not any(path.exists() for path in left)
    assert set(map(str, left)) <= set(done.removed_files)


def test_decommission_of_a_destroyed_header_removes_the_files(lab, capsys):
    lab.run(capsys, "header", "backup")
    destroy_header(lab.image)

    done = decommission(load_volume_config(lab.ini), lab.ini, None, None)

    assert done.steps == [] and str(lab.backup) in done.removed_files and not lab.ini.exists()


def test_decommission_finds_the_device_by_the_ini_when_the_uuid_link_is_gone(lab, monkeypatch):
    uuid_link_gone(lab, monkeypatch)  # udev not running, or the link removed: the header itself is intact

    done = decommission(load_volume_config(lab.ini), lab.ini, None, None)

    assert done.steps == ["erased every keyslot"] and not opens(lab.image, PASSPHRASE)



def test_decommission_of_a_mounted_volume_closes_it_first_and_says_so(lab, monkeypatch):
    """The kernel's side is faked at the runner seam (the lab's image has no mapping to close):
    umount and cryptsetup close succeed and change the state read; every other command is real."""
    from luksctl import runner
    from luksctl.root import volume
    from luksctl.status import VolumeStatus

    kernel = {"mapped": True, "mounted": True}
    real_run = runner.run

    def run(argv, **kwargs):
        if argv[0] == "umount" or argv[:2] == ["cryptsetup", "close"]:
            kernel["mounted" if argv[0] == "umount" else "mapped"] = False
            return runner.Result(list(argv), 0, "", "")
        return real_run(argv, **kwargs)

    monkeypatch.setattr(runner, "run", run)
    monkeypatch.setattr(volume, "current_status", lambda vol: VolumeStatus("254:0" if kernel["mapped"] else None, kernel["mounted"]))

    done = decommission(load_volume_config(lab.ini), lab.ini, None, None)

    assert kernel == {"mapped": False, "mounted": False}
    assert done.steps == ["closed", "erased every keyslot"] and not opens(lab.image, PASSPHRASE)

def test_no_secret_in_any_argv_or_log_line(lab, capsys, monkeypatch, caplog):
    from luksctl import runner

    argvs = []
    real_run = runner.run

    def recording_run(argv, **kwargs):
        argvs.append(list(argv))
        return real_run(argv, **kwargs)

    monkeypatch.setattr(runner, "run", recording_run)
    caplog.set_level("DEBUG")
    _, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)
    key = answer["recovery_key"]
    lab.run(capsys, "report", "--check-passphrase", stdin=key.encode())
    lab.run(capsys, "recovery-key", "remove", stdin=PASSPHRASE)

    assert len(argvs) > 10
    secrets = (PASSPHRASE.decode(), key)
    assert not [arg for argv in argvs for arg in argv if any(secret in arg for secret in secrets)]
    assert not [line for line in caplog.text.splitlines() if any(secret in line for secret in secrets)]


def test_header_restore_on_a_terminal_needs_the_volume_name_typed(lab, capsys):
    lab.run(capsys, "header", "backup")
    subprocess.run(["cryptsetup", "luksErase", "--batch-mode", str(lab.image)], check=True, capture_output=True)

    wrong = main(["header", "restore"], paths=lab.paths, stdin=io.BytesIO(b"yes\n"), stdin_is_tty=True)
    assert wrong == EXIT_REFUSED and not opens(lab.image, PASSPHRASE)
    assert "Type the volume name 'labvol'" in capsys.readouterr().err

    typed = main(["header", "restore"], paths=lab.paths, stdin=io.BytesIO(b"labvol\n"), stdin_is_tty=True)
    assert typed == EXIT_OK and opens(lab.image, PASSPHRASE)


def test_header_restore_checks_the_device_again_after_the_answer(lab, capsys):
    """The disk is swapped for another volume while the operator types the name: nothing is written."""
    lab.run(capsys, "header", "backup")
    swapped = {}

    class SwapsTheDiskWhileAsking(io.BytesIO):
        def readline(self, *args):
            lab.image.unlink()
            swapped["uuid"] = luks_format(lab.image, b"another volume")
            swapped["header"] = lab.image.read_bytes()
            return b"labvol\n"

    code = main(["--json", "header", "restore"], paths=lab.paths, stdin=SwapsTheDiskWhileAsking(), stdin_is_tty=True)

    assert code == EXIT_REFUSED
    error = json.loads(capsys.readouterr().out)["error"]
    assert error == f"{lab.image} holds volume {swapped['uuid']}, not {lab.uuid}; nothing was written"
    assert lab.image.read_bytes() == swapped["header"]


def test_rotate_and_decommission_take_no_token_in_argv(lab, capsys):
    for command in ("rotate", "decommission"):
        with pytest.raises(SystemExit) as usage:
            main([command, "--vault-url", "http://127.0.0.1:1", "--secret-path", "a/b", "--token", "s.secret"], paths=lab.paths)
        assert usage.value.code == 64


@pytest.mark.parametrize("command", [["rotate", *FAST_NEW_SLOT], ["decommission", "--yes"]])
def test_a_token_on_a_stdin_that_never_closes_times_out_before_the_lock_is_taken(lab, capsys, monkeypatch, command):
    monkeypatch.setattr(secret_input, "STDIN_DEADLINE", 1)
    read_end, write_end = os.pipe()
    os.write(write_end, b"s.token-but-no-end-of-file\n")
    box = {}
    argv = ["--json", *command, "--vault-url", "http://127.0.0.1:9", "--secret-path", "a/b", "--token-file", "-"]
    with os.fdopen(read_end, "rb") as stdin:
        thread = threading.Thread(target=lambda: box.update(code=main(argv, paths=lab.paths, stdin=stdin, stdin_is_tty=False)), daemon=True)
        thread.start()
        try:
            time.sleep(0.3)  # the command is now waiting for the token's end of file
            assert thread.is_alive() and lock_is_free(lab.paths.lock_file), "the lock is held while the token is read"
            thread.join(5)
            assert not thread.is_alive(), "the token read has no deadline"
        finally:
            os.close(write_end)
            thread.join(10)

    assert box["code"] == EXIT_USAGE
    assert "not closed within 1 s" in json.loads(capsys.readouterr().out)["error"]
    assert opens(lab.image, PASSPHRASE)


def test_header_restore_asks_before_it_waits_for_the_lock(lab, capsys, monkeypatch):
    lab.run(capsys, "header", "backup")
    monkeypatch.setattr(cli, "LOCK_WAIT", 1)

    with lock_held_elsewhere(lab.paths.lock_file):  # an open holds the volume lock
        code = main(["header", "restore"], paths=lab.paths, stdin=io.BytesIO(b"not the name\n"), stdin_is_tty=True)

    assert code == EXIT_REFUSED, "the answer must be asked for, and refused, before the lock is waited on"
    assert "Type the volume name 'labvol'" in capsys.readouterr().err


# --- rotate's pending file, killed at every point (issue 24) ---------------------------------

REF = SecretRef("secrets", "sub/deploy-1/storage_encryption", "storage_encryption_key", 2)
NEW_SLOT_COST = cryptsetup.Pbkdf("pbkdf2", 1)


class MemoryVault:
    """The Keystore seam rotate uses: one KV v2 secret, in memory."""

    def __init__(self, value: bytes) -> None:
        self.value, self.version = value.decode(), 1

    def capabilities(self, ref):
        return {"read", "update"}

    def read(self, ref):
        return StoredSecret(self.value, self.version)

    def write(self, ref, value, *, cas):
        assert cas == self.version, "rotate writes over the version it read"
        self.value, self.version = value, self.version + 1
        return self.version


class Killed(BaseException):
    """SIGKILL: the run stops here."""


def kill_at(monkeypatch, point: int | None) -> list[str]:
    """Count the pending store's file operations; before operation `point` the process dies.
    A write killed mid-way leaves its temporary (write_atomically's finally never runs)."""
    done: list[str] = []
    write, remove = pending.write_atomically, pending.remove_durably

    def killable(operation, real):
        def run(path, *args, **kwargs):
            if len(done) == point:
                if operation == "write":
                    (path.parent / f".{path.name}.0123abcd.tmp").write_bytes(args[0])
                raise Killed(f"{operation} {path.name}")
            done.append(f"{operation} {path.name}")
            return real(path, *args, **kwargs)
        return run

    monkeypatch.setattr(pending, "write_atomically", killable("write", write))
    monkeypatch.setattr(pending, "remove_durably", killable("remove", remove))
    return done


def fresh_lab(tmp_path, name: str, patch) -> Lab:
    """A volume as setup leaves it: its header backup opens with the passphrase Vault holds."""
    (tmp_path / name).mkdir()
    lab = Lab(tmp_path / name, patch)
    header.write_backup(str(lab.image), lab.backup)
    return lab


def rotate_lab(lab, vault: MemoryVault):
    return rotate.rotate(str(lab.image), vault, REF, lab.dir, lab.backup, NEW_SLOT_COST)


def assert_rotated(lab, vault: MemoryVault) -> None:
    """The device and its header backup open with Vault's passphrase, and neither with the old one."""
    assert opens(lab.image, vault.value.encode()) and not opens(lab.image, PASSPHRASE)
    assert opens(lab.backup, vault.value.encode()) and not opens(lab.backup, PASSPHRASE)
    assert sorted(p.name for p in lab.dir.iterdir() if p.is_file()) == ["disk.img", "luks-cryptdev.ini", "luks-header.bck", "luks-header.bck.sha256"]


def test_rotate_killed_at_each_of_its_pending_file_operations_finishes_on_a_rerun(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        operations = kill_at(patch, None)
        rotate_lab(fresh_lab(tmp_path, "count", patch), MemoryVault(PASSPHRASE))
    assert len(operations) >= 3, operations  # the pending file written, the old form and it removed

    for point in range(len(operations)):
        with monkeypatch.context() as patch:
            lab = fresh_lab(tmp_path, str(point), patch)
            vault = MemoryVault(PASSPHRASE)
            with monkeypatch.context() as killing, pytest.raises(Killed):
                kill_at(killing, point)
                rotate_lab(lab, vault)
            assert opens(lab.image, vault.value.encode()), f"killed before {operations[point]}: Vault's passphrase must open"

            rotate_lab(lab, vault)  # killed after the pending file went, this is a second rotation: as good

            assert_rotated(lab, vault)


@pytest.mark.parametrize("old_form", ["passphrase only", "passphrase and state", "after luksAddKey", "after the Vault write",
                                      "after luksAddKey, state lost"])
def test_rotate_finishes_a_rotation_an_older_version_left_in_two_files(lab, old_form):
    """Killed between its two writes, the old form left the passphrase alone: exit 7 until a person came.
    A passphrase already in a keyslot keeps that slot, even with the state gone: it is not added twice."""
    vault = MemoryVault(PASSPHRASE)
    header.write_backup(str(lab.image), lab.backup)  # setup's, which opens with the old passphrase
    new = b"NewPassphraseSavedByAnOlderVersion0123456789"
    (lab.dir / "rotate-pending-passphrase").write_bytes(new)
    (lab.dir / "rotate-pending-passphrase").chmod(0o600)
    if old_form not in ("passphrase only", "after luksAddKey, state lost"):
        (lab.dir / "rotate-state.json").write_text('{"old_slot": 0, "new_slot": 1}\n')
        (lab.dir / "rotate-state.json").chmod(0o600)
    if old_form.startswith("after"):
        subprocess.run(["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(PASSPHRASE)}", *FAST_NEW_SLOT, str(lab.image)],
                       input=PASSPHRASE + new, check=True, capture_output=True)
    if old_form == "after the Vault write":  # its state file is what tells the old slot from the new
        vault.value = new.decode()

    rotation = rotate_lab(lab, vault)

    assert rotation.resumed and vault.value.encode() == new and rotation.vault_version == vault.version
    assert_rotated(lab, vault)
    assert sorted(cryptsetup.read_header(str(lab.image)).keyslots) == [1]


def test_rotate_refuses_an_old_form_passphrase_vault_holds_without_its_state(lab):
    """Its slots cannot be worked out: Vault's passphrase is the new one, and nothing tells the old slot."""
    new = b"NewPassphraseSavedByAnOlderVersion0123456789"
    (lab.dir / "rotate-pending-passphrase").write_bytes(new)
    (lab.dir / "rotate-pending-passphrase").chmod(0o600)
    before = hashlib.sha256(lab.image.read_bytes()).hexdigest()

    with pytest.raises(Refused) as refused:
        rotate_lab(lab, MemoryVault(new))

    assert str(refused.value) == (f"Vault holds the pending passphrase of {lab.dir / 'rotate-pending-passphrase'} but its rotation "
                                  "state is gone; compare it with the device, then move it away")
    assert hashlib.sha256(lab.image.read_bytes()).hexdigest() == before
    assert (lab.dir / "rotate-pending-passphrase").read_bytes() == new


def test_rotate_reports_each_step_it_took(tmp_path, monkeypatch):
    lab = fresh_lab(tmp_path, "steps", monkeypatch)
    vault = MemoryVault(PASSPHRASE)

    rotation = rotate_lab(lab, vault)

    assert rotation.steps == ["added new keyslot", "stored in Vault", "removed old keyslot", "wrote header backup"]
    assert (rotation.new_slot, rotation.removed_slot, rotation.vault_version, rotation.resumed) == (1, 0, 2, False)


def test_rotate_stops_before_vault_if_luksaddkey_added_nothing(lab, monkeypatch):
    """cryptsetup said yes but the new passphrase opens nothing: Vault must keep the one that opens."""
    monkeypatch.setattr(rotate, "add_key", lambda *args: None)
    vault = MemoryVault(PASSPHRASE)

    with pytest.raises(Refused) as refused:
        rotate_lab(lab, vault)

    assert str(refused.value) == f"the new passphrase does not open keyslot 1 of {lab.image} after luksAddKey; the old one still does"
    assert (vault.value.encode(), vault.version) == (PASSPHRASE, 1) and opens(lab.image, PASSPHRASE)


def test_rotate_refuses_when_vault_holds_the_pending_passphrase_but_no_keyslot_does(lab):
    """Only a restored header (or a hand-killed slot) gets here: the pending file is then the one copy left that is known."""
    new = b"NewPassphraseNoKeyslotHolds0123456789abcdefgh"
    (lab.dir / "rotate-pending.json").write_text(json.dumps({"passphrase": new.decode(), "old_slot": 0, "new_slot": 1}))
    (lab.dir / "rotate-pending.json").chmod(0o600)

    with pytest.raises(Refused) as refused:
        rotate_lab(lab, MemoryVault(new))

    assert str(refused.value) == (f"Vault holds the pending passphrase but it opens no keyslot of {lab.image}; "
                                  f"keep {lab.dir / 'rotate-pending.json'} and restore the header backup")
    assert opens(lab.image, PASSPHRASE) and (lab.dir / "rotate-pending.json").exists()


def test_rotate_refuses_an_old_form_passphrase_when_vaults_does_not_open_the_volume(lab):
    (lab.dir / "rotate-pending-passphrase").write_bytes(b"NewPassphraseSavedByAnOlderVersion0123456789")
    (lab.dir / "rotate-pending-passphrase").chmod(0o600)

    with pytest.raises(Refused) as refused:
        rotate_lab(lab, MemoryVault(b"not this volume's passphrase"))

    assert str(refused.value) == f"the passphrase in Vault at {REF} does not open {lab.image}; nothing was changed"
    assert opens(lab.image, PASSPHRASE)


class NoCapabilityVault(MemoryVault):
    def capabilities(self, ref):
        return set()


def test_rotate_with_a_token_that_has_no_capability_there_says_so(lab):
    with pytest.raises(VaultDenied) as refused:
        rotate_lab(lab, NoCapabilityVault(PASSPHRASE))

    assert str(refused.value) == (f"rotation needs read and update on {REF}; this token has nothing there "
                                  "(the dashboard's tokens are create-only or read-only); nothing was changed")
    assert opens(lab.image, PASSPHRASE) and not (lab.dir / "rotate-pending.json").exists()


def test_a_pending_file_that_is_not_private_is_refused(lab):
    (lab.dir / "rotate-pending.json").write_text('{"passphrase": "x", "old_slot": 0, "new_slot": 1}\n')
    (lab.dir / "rotate-pending.json").chmod(0o644)

    with pytest.raises(Refused, match="private to root"):
        rotate_lab(lab, MemoryVault(PASSPHRASE))
    assert opens(lab.image, PASSPHRASE)


def test_report_lists_and_decommission_removes_a_killed_writes_temporary(lab, capsys):
    leftover = lab.dir / ".rotate-pending.json.0123abcd.tmp"
    leftover.write_text('{"passphrase": "half a rotation"}')
    lab.run(capsys, "header", "backup")
    (lab.dir / ".luks-header.bck.0123abcd.tmp").write_bytes(b"a header copy")

    _, answer = lab.run(capsys, "report")
    assert answer["pending"] == [f"rotate ({leftover}); run luksctl rotate again"]

    done = decommission(load_volume_config(lab.ini, root_owned=False), lab.ini, None, None)

    assert str(leftover) in done.removed_files and not leftover.exists()
    assert not (lab.dir / ".luks-header.bck.0123abcd.tmp").exists()


def test_rotate_from_the_recovery_key_is_refused_and_changes_nothing(lab, capsys):
    """Rotating away from the slot Vault's passphrase opens would kill the recovery key's slot."""
    _, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)
    recovery_key = answer["recovery_key"].encode()
    before = hashlib.sha256(lab.image.read_bytes()).hexdigest()
    vault = MemoryVault(recovery_key)  # someone stored the recovery key in Vault

    with pytest.raises(Refused) as refused:
        rotate_lab(lab, vault)

    assert str(refused.value) == f"the passphrase in Vault at {REF} is the recovery key (keyslot 1); nothing was changed"

    assert hashlib.sha256(lab.image.read_bytes()).hexdigest() == before
    assert vault.value.encode() == recovery_key and not (lab.dir / "rotate-pending.json").exists()


def test_decommission_removes_every_pending_passphrase_of_setup_and_rotate(lab):
    """They hold passphrases that open the volume but not its UUID: a search for the UUID misses them."""
    names = [*pending.FILES["setup"], *pending.FILES["rotate"]]
    for name in names:
        (lab.dir / name).write_bytes(b"a passphrase that opens it")
        (lab.dir / name).chmod(0o600)

    done = decommission(load_volume_config(lab.ini, root_owned=False), lab.ini, None, None)

    assert sorted(name for name in names if (lab.dir / name).exists()) == []
    assert {str(lab.dir / name) for name in names} <= set(done.removed_files)
