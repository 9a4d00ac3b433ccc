"""The LUKS header's backup file (write, verify, restore) and the device it belongs to.

A header backup opens the volume with every passphrase its keyslots held when it was
taken, so a backup is only as safe as its oldest keyslot. Backups are byte copies
made by `cryptsetup luksHeaderBackup`, which are identical for an unchanged header:
comparing checksums is how `verify` tells whether a backup is current.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config import VolumeConfig
from ..durable import leftover_temporaries, write_atomically
from ..errors import CommandFailed, DeviceNotFound, Refused
from . import blockdev, cryptsetup

SCRATCH_PREFIX = ".luksctl-"  # then the pid of the run that made it


def backup_path(configured: str | None) -> Path:
    return Path(configured) if configured else cryptsetup.DEFAULT_HEADER_BACKUP


def checksum_path(backup: Path) -> Path:
    """The sidecar `<backup>.sha256`, in `sha256sum -c` format."""
    return backup.with_name(backup.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_checksum(backup: Path) -> str | None:
    try:
        return checksum_path(backup).read_text().split()[0]
    except (FileNotFoundError, IndexError):
        return None


def stale_copies(backup: Path) -> list[Path]:
    """Header copies a killed run left beside `backup` (a SIGKILL skips every `finally`): scratch
    directories of runs that are gone, and temporaries of the backup and its checksum whose rename
    never came. They open the volume with the keys of their day. A live run's own is left alone."""
    try:
        candidates = [path for path in backup.parent.iterdir() if path.name.startswith(SCRATCH_PREFIX) and path.is_dir()]
    except OSError:
        candidates = []
    scratch = [path for path in candidates if not _alive(path.name[len(SCRATCH_PREFIX):].split("-")[0])]
    return sorted([*scratch, *leftover_temporaries(backup), *leftover_temporaries(checksum_path(backup))])


def _alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def remove_stale_copies(backup: Path) -> list[Path]:
    stale = stale_copies(backup)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextmanager
def _private_dir(near: Path) -> Iterator[Path]:
    """A 0700 scratch directory beside `near`, for header copies (they open the volume).

    Its name carries our pid, so that the next run removes it if a kill leaves it behind.
    """
    near.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_stale_copies(near)
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=near.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy_header(device: str, target: Path) -> str:
    cryptsetup.backup_header(device, target)
    return sha256_of(target)


def current_checksum(device: str, near: Path) -> str:
    """Checksum of the device's header now, as a backup taken now would have it."""
    with _private_dir(near) as scratch:
        return _copy_header(device, scratch / "header")


def write_backup(device: str, backup: Path, *, replace: bool = True) -> str:
    """Replace `backup` with the device's header (0600) and record its checksum beside it.

    Each file is replaced whole or not at all (durable.write_atomically). A crash between
    the two leaves a checksum that no longer matches: `verify` says so, a re-run fixes it.
    replace=False (setup) never replaces an existing backup: one identical to the header now
    (an interrupted run's) is kept, any other raises FileExistsError.
    """
    with _private_dir(backup) as scratch:
        copy = scratch / "header"
        checksum = _copy_header(device, copy)
        data = copy.read_bytes()
    try:
        write_atomically(backup, data, mode=0o600, replace=replace)
    except FileExistsError:
        if backup.read_bytes() != data:
            raise
    write_atomically(checksum_path(backup), f"{checksum}  {backup.name}\n".encode(), mode=0o600)
    return checksum


@dataclass(frozen=True)
class BackupCheck:
    path: str
    exists: bool
    age_seconds: float | None = None
    intact: bool | None = None  # the file still has the checksum recorded when it was written (None: none recorded)
    matches: bool | None = None  # byte-identical to the device's header now
    same_volume: bool | None = None
    keyslots_current: bool | None = None  # same keyslots, same salts: opens with exactly today's keys
    device_header_missing: bool | None = None  # zeroed or overwritten: what `header restore` is for

    @property
    def ok(self) -> bool:
        return bool(self.exists and self.matches and self.intact is not False)


def check_backup(device: str, backup: Path, now: float) -> BackupCheck:
    if not backup.is_file():
        return BackupCheck(str(backup), exists=False)
    actual = sha256_of(backup)
    recorded = recorded_checksum(backup)
    age = round(now - backup.stat().st_mtime, 1)
    intact = None if recorded is None else recorded == actual
    if not cryptsetup.is_luks(device):
        return BackupCheck(str(backup), exists=True, age_seconds=age, intact=intact, matches=False, device_header_missing=True)
    on_device, in_backup = cryptsetup.read_header(device), cryptsetup.read_header(backup)
    return BackupCheck(
        str(backup),
        exists=True,
        age_seconds=age,
        intact=intact,
        matches=current_checksum(device, backup) == actual,
        same_volume=on_device.uuid == in_backup.uuid,
        keyslots_current=on_device.keyslots == in_backup.keyslots,
    )


def find_device(volume: VolumeConfig, given: str | None = None) -> str:
    """The volume's device for the header commands: the one given (--device), else the one its
    uuid names, else, when no header says that uuid any more (what they repair), the ini's `device`."""
    if given is None and (os.path.exists(volume.device_path) or not volume.device):
        cryptsetup.require_device(volume.device_path)
        return volume.device_path
    device = given or volume.device
    if not os.path.exists(device):
        named = "given with --device" if given else "the ini's device"
        raise DeviceNotFound(f"neither LUKS device {volume.device_path} (uuid from the ini file) nor {device} ({named}) is attached")
    if cryptsetup.is_luks(device) and cryptsetup.luks_uuid(device).lower() != volume.uuid.lower():
        raise DeviceNotFound(f"LUKS device {volume.device_path} (uuid from the ini file) is not attached; {device} holds another volume")
    return device


def _require_trusted(path: Path, *, directory: bool = False) -> None:
    """`path` (not a symlink) must be root's and writable by nobody else: root restores what it says."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise Refused(f"{path} does not exist; nothing was written") from None
    kind, what = (stat.S_ISDIR, "directory") if directory else (stat.S_ISREG, "regular file")
    if not kind(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise Refused(f"{path} must be a {what} owned by root and not writable by group or others "
                      f"(uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); nothing was written")


@contextmanager
def verified_copy(backup: Path) -> Iterator[Path]:
    """The backup, copied into a private scratch directory and checked against the checksum recorded
    when it was written: what a restore reads, so the file cannot be swapped after it was checked."""
    _require_trusted(backup.parent, directory=True)
    for path in (backup, checksum_path(backup)):
        _require_trusted(path)
    recorded = recorded_checksum(backup)
    if recorded is None:
        raise Refused(f"{checksum_path(backup)} records no checksum: nothing says {backup} is the backup luksctl wrote; nothing was written")
    with _private_dir(backup) as scratch:
        copy = scratch / "header"
        fd = os.open(backup, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as source, copy.open("xb") as target:
            shutil.copyfileobj(source, target)
        if sha256_of(copy) != recorded:
            raise Refused(f"{backup} no longer matches the checksum recorded in {checksum_path(backup)}; it is damaged or was replaced")
        yield copy


def check_restorable(device: str, copy: Path, backup: Path, expected_uuid: str, cryptdev: str) -> list[str]:
    """Refuse a backup of another volume, or a device that is another volume, in use by anything but
    the volume's own mapper, smaller than the backup, or holding another signature. `copy` is
    verified_copy's of `backup`. The warnings: a backup whose keyslots differ from the device's."""
    saved = cryptsetup.read_header(copy)
    if saved.uuid.lower() != expected_uuid.lower():
        raise Refused(f"{backup} is the header of volume {saved.uuid}, not of this volume ({expected_uuid}); nothing was written")
    try:
        on_device = cryptsetup.read_header(device)
    except CommandFailed:
        on_device = None  # a damaged header is why one restores: the by-uuid link and the ini named it
    if on_device is not None and on_device.uuid.lower() != saved.uuid.lower():
        raise Refused(f"{device} holds volume {on_device.uuid}, not {saved.uuid}; nothing was written")
    if blockdev.size_in_bytes(device) < copy.stat().st_size:
        raise Refused(f"{device} is smaller than the header in {backup}: it is not that volume's device; nothing was written")
    if stat.S_ISBLK(os.stat(device).st_mode):  # an image file (tests, recovery on a copy) has no users and no partitions
        target = blockdev.block_device(device)
        busy = blockdev.users(target, allowed_holder=cryptdev)
        if busy:
            raise Refused(f"{device} is in use: {'; '.join(busy)}; nothing was written")
        other = [found for found in blockdev.signatures(target) if found != "signature crypto_LUKS"]
        if other:
            raise Refused(f"{device} holds {', '.join(other)}, not only a LUKS header; nothing was written")
    if on_device is not None and on_device.keyslots != saved.keyslots:
        return [f"the keyslots of {backup} differ from the device's: restoring it brings back every passphrase "
                "its keyslots held (one rotated out since opens the volume again) and drops any added since"]
    return []


def describe(header: cryptsetup.LuksHeader) -> dict:
    """The header as the report shows it (no salts: they mean nothing to an operator)."""
    return {
        "luks_version": header.version,
        "uuid": header.uuid,
        "cipher": header.cipher,
        "key_size": header.key_size,
        "keyslots": [
            {"slot": slot.slot, "pbkdf": slot.pbkdf, **slot.cost, "recovery_key": slot.slot in header.recovery_slots}
            for slot in sorted(header.keyslots.values(), key=lambda s: s.slot)
        ],
    }

