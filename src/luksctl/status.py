"""Volume and NFS state read from /proc and /sys: no root, no process.

The API answers every dashboard poll from here, so this must stay a couple
of small file reads.
"""

from __future__ import annotations

import enum
import re
from collections import namedtuple
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
SYS_BLOCK = Path("/sys/block")
NFS_TYPES = frozenset({"nfs", "nfs4"})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class VolumeState(str, enum.Enum):
    MOUNTED = "mounted"
    UNMOUNTED = "unmounted"
    UNAVAILABLE = "unavailable"


# Named tuples, not dataclasses: every `luksctl status` imports this module, and importing
# dataclasses (with inspect) costs milliseconds of each start (BENCHMARKS.md, start-up).
Mount = namedtuple("Mount", "device mountpoint fstype source")  # device is "major:minor"


class VolumeStatus(namedtuple("VolumeStatus", "mapper_device mounted")):
    """mapper_device: "major:minor" of /dev/mapper/<cryptdev>, None when closed;
    mounted: that device is mounted on the configured mountpoint."""

    __slots__ = ()

    @property
    def mapper_open(self) -> bool:
        return self.mapper_device is not None

    @property
    def state(self) -> VolumeState:
        return VolumeState.MOUNTED if self.mounted else VolumeState.UNMOUNTED


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo.
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            mounts.append(Mount(fields[2], _unescape(fields[4]), fields[separator + 1], _unescape(fields[separator + 2])))
        except (ValueError, IndexError):
            continue  # not a mount line; the format allows optional fields
    return mounts


def read_mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    return parse_mountinfo(mountinfo.read_text(encoding="utf-8", errors="surrogateescape"))


def find_mapper_device(cryptdev: str, sys_block: Path = SYS_BLOCK) -> str | None:
    """major:minor of the active device-mapper device named `cryptdev`, or None."""
    for name_file in sys_block.glob("dm-*/dm/name"):
        try:
            if name_file.read_text().strip() == cryptdev:
                return (name_file.parent.parent / "dev").read_text().strip()
        except FileNotFoundError:
            continue  # removed while we looked
    return None


def volume_status(cryptdev: str, mountpoint: str, *, sys_block: Path = SYS_BLOCK, mountinfo: Path = MOUNTINFO) -> VolumeStatus:
    device = find_mapper_device(cryptdev, sys_block)
    mounted = device is not None and any(
        mount.device == device and mount.mountpoint == mountpoint for mount in read_mounts(mountinfo)
    )
    return VolumeStatus(device, mounted)


def nfs_mount_states(mountpoints: list[str], *, mountinfo: Path = MOUNTINFO) -> dict[str, bool]:
    """For each mountpoint: is an NFS filesystem mounted on it?"""
    nfs_mounted = {mount.mountpoint for mount in read_mounts(mountinfo) if mount.fstype in NFS_TYPES}
    return {mountpoint: mountpoint in nfs_mounted for mountpoint in mountpoints}
