"""What a block device is and who uses it, read before `setup` writes to it.

Everything here only reads (sysfs, /proc, `blkid -p`), except zero_device(),
which `setup --wipe` runs on the freshly opened mapper.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import runner
from ..errors import CommandFailed, NotBlockDevice
from ..status import read_mounts

SYS_DEV_BLOCK = Path("/sys/dev/block")
PROC_SWAPS = Path("/proc/swaps")
BLKID_TIMEOUT = 60
BLKID_NOTHING_FOUND = 2  # blkid(8): "the specified token was not found, or no (specified) devices could be identified"
ZERO_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class BlockDevice:
    path: str
    dev: str  # "major:minor"

    @property
    def sysfs(self) -> Path:
        return SYS_DEV_BLOCK / self.dev


def size_in_bytes(path: str) -> int:
    """Of a block device (whose stat() size is 0) or an image file."""
    with open(path, "rb") as stream:
        return stream.seek(0, os.SEEK_END)


def block_device(path: str) -> BlockDevice:
    """The block device at `path` (symlinks followed); anything else is refused."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise NotBlockDevice(f"{path} does not exist") from None
    except OSError as exc:
        raise NotBlockDevice(f"{path} cannot be examined: {exc.strerror}") from None
    if not stat.S_ISBLK(info.st_mode):
        raise NotBlockDevice(f"{path} is not a block device; setup encrypts a whole disk such as /dev/vdb")
    return BlockDevice(path, f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}")


def identity(device: BlockDevice) -> dict[str, str]:
    """What tells this disk from another attached later under the same name and numbers: its
    major:minor, size, and the serial and WWN the hardware reports, where it reports them.
    (No partition-table UUID: luksFormat replaces the table, and the identity must outlive it.)"""
    found = {"dev": device.dev, "size": _read(device.sysfs / "size")}  # in 512-byte sectors
    for key, names in (("serial", ("serial", "device/serial")), ("wwn", ("wwid", "device/wwid"))):
        value = next((value for name in names if (value := _read(device.sysfs / name))), "")
        if value:
            found[key] = value
    return found


def _partitions(device: BlockDevice) -> list[Path]:
    """sysfs directories of the device's partitions (each has a `partition` file)."""
    try:
        return [child for child in device.sysfs.resolve().iterdir() if (child / "partition").exists()]
    except OSError:
        return []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def holders(device: BlockDevice) -> dict[str, str]:
    """Device-mapper (or md) devices stacked on the device or its partitions: sysfs name -> dm name."""
    found = {}
    for node in [device.sysfs.resolve(), *_partitions(device)]:
        holder_dir = node / "holders"
        for holder in holder_dir.iterdir() if holder_dir.is_dir() else ():
            found[holder.name] = _read(holder / "dm" / "name") or holder.name
    return found


def users(device: BlockDevice, *, allowed_holder: str | None = None) -> list[str]:
    """Why the device is busy: mounts, swap, stacked devices (except the mapper `allowed_holder`)."""
    numbers = {device.dev: device.path}
    for part in _partitions(device):
        numbers[_read(part / "dev")] = f"partition {part.name}"
    reasons = [f"{numbers[m.device]} is mounted on {m.mountpoint}" for m in read_mounts() if m.device in numbers]
    for line in _read(PROC_SWAPS).splitlines()[1:]:
        swap = line.split()[0] if line.split() else ""
        if swap and _numbers_of(swap) in numbers:  # by number: /dev/vdaa is not a partition of /dev/vda
            reasons.append(f"{swap} is in use as swap")
    for name, dm_name in holders(device).items():
        if dm_name != allowed_holder:
            reasons.append(f"{dm_name} ({name}) is stacked on it (close it first)")
    return reasons


def _numbers_of(path: str) -> str | None:
    """A block device's major:minor; None for a swap file (its filesystem's mount is the user)."""
    try:
        return block_device(path).dev
    except NotBlockDevice:
        return None


def signatures(device: BlockDevice) -> list[str]:
    """Filesystem, partition-table and LUKS signatures `blkid -p` finds, plus partitions in sysfs."""
    result = runner.run(["blkid", "-p", "-o", "export", device.path], timeout=BLKID_TIMEOUT, check=False)
    if result.returncode not in (0, BLKID_NOTHING_FOUND):
        raise CommandFailed(f"blkid could not probe {device.path}", result.argv, result.returncode, result.stderr)
    found = []
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key in ("TYPE", "PTTYPE"):
            found.append(f"{'partition table' if key == 'PTTYPE' else 'signature'} {value}")
    found.extend(f"partition {part.name}" for part in _partitions(device))
    return found


def zero_device(path: str, report: Callable[[int, int], None]) -> int:
    """Write zeros over the whole of `path`; report(done, total) after each chunk. Returns bytes written."""
    chunk = bytes(ZERO_CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        total = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        done = 0
        while done < total:
            done += os.write(fd, chunk[: min(ZERO_CHUNK, total - done)])
            report(done, total)
        os.fsync(fd)
        return done
    finally:
        os.close(fd)
