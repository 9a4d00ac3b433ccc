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
from ..errors import CommandFailed, LuksctlError, VolumeBusy, WrongPassphrase
from ..status import VolumeStatus, volume_status
from . import cryptsetup

log = logging.getLogger(__name__)

MOUNT_TIMEOUT = 60
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
    cryptsetup.require_device(volume.device_path)
    open_mapper(volume.device_path, volume.cryptdev, passphrase)


def open_mapper(device_path: str, cryptdev: str, passphrase: bytes) -> None:
    """Map the device; setup opens by device path, before udev's link exists."""
    cryptsetup.open_mapper(device_path, cryptdev, passphrase, on_wrong_key="the volume stays closed")


def check_passphrase(volume: VolumeConfig, passphrase: bytes) -> None:
    """Raises WrongPassphrase unless `passphrase` unlocks a key slot of the header; maps nothing."""
    cryptsetup.require_device(volume.device_path)
    if not cryptsetup.opens(volume.device_path, passphrase):
        raise WrongPassphrase(f"the passphrase does not open {volume.device_path}; {volume.mapper_path} stays mapped and not mounted")


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
    cryptsetup.close_mapper(volume.cryptdev)


def _close_quietly(volume: VolumeConfig) -> None:
    try:
        luks_close(volume)
    except (CommandFailed, VolumeBusy) as exc:  # the mount error matters more; this one is logged
        log.error("could not close %s after a failed mount: %s", volume.cryptdev, exc)
