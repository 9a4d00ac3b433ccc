"""The power-cut pair's persistent disk (scripts/vm-powercut.sh makes it, vm-run.sh attaches it):
partition 1 an ext4 holding /etc/luks and the first boot's notes, partition 2 the LUKS volume.
Both boots mount it the same way, so the second sees exactly what the cut left on the disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

from helpers_vm import LUKS_DIR, Volume, run, wait_until

STATE_PARTITION = "/dev/vda1"  # vng --disk attaches a virtio-blk disk; the root is 9p
LUKS_PARTITION = "/dev/vda2"
PERSIST = Path("/srv/persist")  # / is read-only in the guest; /srv is a writable overlay
NOTES = PERSIST / "notes.json"  # what the first boot did, for the second to check
PASSPHRASE = b"power cut passphrase"  # a test volume's; the second boot stores it in its own OpenBao
CRYPTDEV = "powercut"
CUT_AFTER_SECONDS = 2  # after the re-encryption's device stack appears: into the data, past the first hotzone


def attach() -> None:
    """The disk's driver, then its partitions' nodes (devtmpfs makes them; there is no udev)."""
    run("modprobe", "virtio_blk")
    wait_until(lambda: Path(LUKS_PARTITION).exists(), 60, f"{LUKS_PARTITION} (is VM_DISK attached?)")


def mount_persistent_etc_luks() -> None:
    attach()
    PERSIST.mkdir(exist_ok=True)
    run("mount", STATE_PARTITION, str(PERSIST))
    (PERSIST / "luks").mkdir(mode=0o755, exist_ok=True)
    run("mount", "--bind", str(PERSIST / "luks"), str(LUKS_DIR))


def unmount_persistent_etc_luks() -> None:
    run("umount", str(LUKS_DIR))
    run("umount", str(PERSIST))


def the_volume(uuid: str) -> Volume:
    return Volume(PASSPHRASE, Path(LUKS_PARTITION), LUKS_PARTITION, uuid=uuid, cryptdev=CRYPTDEV)


def write_notes(notes: dict) -> None:
    """Durably: a power cut may follow at once."""
    temporary = NOTES.with_suffix(".tmp")
    with temporary.open("w") as stream:
        json.dump(notes, stream)
        stream.flush()
        os.fsync(stream.fileno())
    temporary.replace(NOTES)
    directory = os.open(PERSIST, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
