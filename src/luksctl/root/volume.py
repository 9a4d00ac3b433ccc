"""Open, mount, unmount and close the LUKS volume (root only).

Decide, then do: each operation reads the current state first, skips the
steps already done and undoes only what it did itself when a later step fails.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .. import runner
from ..config import VolumeConfig
from ..errors import CommandFailed, DeviceNotFound, LuksctlError, VolumeBusy, WrongPassphrase
from ..status import VolumeStatus, volume_status

log = logging.getLogger(__name__)

# cryptsetup's PBKDF costs ~2 s by design on a fast machine; slow VMs take many times that.
CRYPTSETUP_TIMEOUT = 150
MOUNT_TIMEOUT = 60

# cryptsetup(8) EXIT STATUS
CRYPTSETUP_NO_KEY = 2
CRYPTSETUP_BUSY = 5
# mount(8) RETURN CODES
MOUNT_FAILURE = 32


@dataclass(frozen=True)
class Outcome:
    status: VolumeStatus
    changed: bool


def current_status(volume: VolumeConfig) -> VolumeStatus:
    return volume_status(volume.cryptdev, volume.mountpoint)


def open_volume(volume: VolumeConfig, passphrase: bytes, mount_options: str) -> Outcome:
    """Map and mount the volume; a volume mapped but not mounted is only mounted, and only
    for a passphrase that opens its header: the mapping proves nothing about the caller."""
    before = current_status(volume)
    if before.mounted:
        return Outcome(before, changed=False)
    try:
        if before.mapper_open:
            check_passphrase(volume, passphrase)
        else:
            luks_open(volume, passphrase)
        mount(volume, mount_options)
    except LuksctlError:
        # Leave nothing half-open that we opened, even when cryptsetup died after mapping.
        if not before.mapper_open and current_status(volume).mapper_open:
            _close_quietly(volume)
        raise
    return Outcome(current_status(volume), changed=True)


def close_volume(volume: VolumeConfig) -> Outcome:
    before = current_status(volume)
    if before.mounted:
        umount(volume)
    if before.mapper_open:
        luks_close(volume)
    return Outcome(current_status(volume), changed=before.mapper_open)


def luks_open(volume: VolumeConfig, passphrase: bytes) -> None:
    _require_device(volume)
    open_mapper(volume.device_path, volume.cryptdev, passphrase)


def open_mapper(device_path: str, cryptdev: str, passphrase: bytes) -> None:
    """`cryptsetup open` with the passphrase on stdin; setup opens by device path, before udev's link exists."""
    _cryptsetup_with_key(["open", device_path, cryptdev], device_path, passphrase, "the volume stays closed")


def check_passphrase(volume: VolumeConfig, passphrase: bytes) -> None:
    """Raises WrongPassphrase unless `passphrase` unlocks a key slot of the header; maps nothing."""
    _require_device(volume)
    unchanged = f"{volume.mapper_path} stays mapped and not mounted"
    _cryptsetup_with_key(["open", "--test-passphrase", volume.device_path], volume.device_path, passphrase, unchanged)


def _require_device(volume: VolumeConfig) -> None:
    if not os.path.exists(volume.device_path):
        raise DeviceNotFound(f"LUKS device {volume.device_path} (uuid from the ini file) is not attached")


def _cryptsetup_with_key(args: list[str], device_path: str, passphrase: bytes, on_wrong_key: str) -> None:
    result = runner.run(["cryptsetup", *args, "--key-file=-"], stdin=passphrase, timeout=CRYPTSETUP_TIMEOUT, check=False)
    if result.returncode == CRYPTSETUP_NO_KEY:
        raise WrongPassphrase(f"the passphrase does not open {device_path}; {on_wrong_key}")
    if result.returncode != 0:
        raise CommandFailed(f"cryptsetup could not open {device_path}", result.argv, result.returncode, result.stderr)


def mount(volume: VolumeConfig, options: str) -> None:
    if os.path.lexists(volume.mountpoint) and not os.path.isdir(volume.mountpoint):
        raise LuksctlError(f"the mountpoint {volume.mountpoint} exists but is not a directory")
    try:
        os.makedirs(volume.mountpoint, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise LuksctlError(f"the mountpoint {volume.mountpoint} cannot be created: {exc.strerror}") from None
    runner.run(["mount", "-t", volume.filesystem, "-o", options, volume.mapper_path, volume.mountpoint], timeout=MOUNT_TIMEOUT)


def umount(volume: VolumeConfig) -> None:
    result = runner.run(["umount", volume.mountpoint], timeout=MOUNT_TIMEOUT, check=False)
    if result.returncode == MOUNT_FAILURE and "busy" in result.stderr:
        raise VolumeBusy(f"{volume.mountpoint} is in use; it stays mounted and open (find users with: fuser -vm {volume.mountpoint})")
    if result.returncode != 0:
        raise CommandFailed(f"umount {volume.mountpoint} failed", result.argv, result.returncode, result.stderr)


def luks_close(volume: VolumeConfig) -> None:
    result = runner.run(["cryptsetup", "close", volume.cryptdev], timeout=CRYPTSETUP_TIMEOUT, check=False)
    if result.returncode == CRYPTSETUP_BUSY:
        raise VolumeBusy(f"{volume.mapper_path} is still in use (mounted elsewhere?); it stays open")
    if result.returncode != 0:
        raise CommandFailed(f"cryptsetup could not close {volume.cryptdev}", result.argv, result.returncode, result.stderr)


def _close_quietly(volume: VolumeConfig) -> None:
    try:
        luks_close(volume)
    except (CommandFailed, VolumeBusy) as exc:  # the mount error matters more; this one is logged
        log.error("could not close %s after a failed mount: %s", volume.cryptdev, exc)
