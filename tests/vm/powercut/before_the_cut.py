"""Boot 1 of the power-cut pair (scripts/vm-powercut.sh), run by guest.sh as root.

A LUKS2 volume on the persistent disk, /etc/luks on it too, mounted, with reference data synced;
then `luksctl reencrypt` online and, CUT_AFTER_SECONDS after its device stack appears, a hard reset
with no sync (sysrq b): the guest's page cache is lost, what reached the disk stays. The notes tell
boot 2 what to expect; a failure before the cut leaves notes without "cut", which boot 2 reports.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_vm import CRYPTSETUP, MOUNTPOINT, SERVICE_PATH, mapped, run, volume_key_digest  # noqa: E402
from persistent_disk import (  # noqa: E402
    CRYPTDEV, CUT_AFTER_SECONDS, LUKS_PARTITION, PASSPHRASE, STATE_PARTITION, attach, mount_persistent_etc_luks, the_volume, write_notes)

REFERENCE_SIZE = 8 << 20
FAST_SLOT = ["--pbkdf", "pbkdf2", "--iter-time", "1"]


def main() -> int:
    attach()
    run("mkfs.ext4", "-q", "-F", STATE_PARTITION)
    mount_persistent_etc_luks()
    run(CRYPTSETUP, "luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--batch-mode",
        "--key-file=-", LUKS_PARTITION, input=PASSPHRASE)
    volume = the_volume(run(CRYPTSETUP, "luksUUID", LUKS_PARTITION).stdout.decode().strip())
    volume.link_by_uuid()
    volume.write_ini()
    run(CRYPTSETUP, "open", "--key-file=-", LUKS_PARTITION, CRYPTDEV, input=PASSPHRASE)
    run("mkfs.ext4", "-q", volume.mapper)
    MOUNTPOINT.mkdir(exist_ok=True)
    run("mount", volume.mapper, str(MOUNTPOINT))
    reference = os.urandom(REFERENCE_SIZE)
    (MOUNTPOINT / "reference.bin").write_bytes(reference)
    run("sync")
    notes = {"uuid": volume.uuid, "reference_sha256": hashlib.sha256(reference).hexdigest(),
             "volume_key_digest": volume_key_digest(volume)}
    write_notes(notes)

    command = subprocess.Popen(["/usr/local/sbin/luksctl", "reencrypt", *FAST_SLOT], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": SERVICE_PATH})
    command.stdin.write(PASSPHRASE)
    command.stdin.close()
    deadline = time.monotonic() + 600
    while not mapped(f"{CRYPTDEV}-overlay"):
        if command.poll() is not None:
            sys.exit(f"luksctl reencrypt ended (exit {command.returncode}) before its device stack appeared: nothing to cut")
        if time.monotonic() > deadline:
            sys.exit("no re-encryption device stack after 600 s")
        time.sleep(0.01)
    time.sleep(CUT_AFTER_SECONDS)
    if command.poll() is not None:
        sys.exit(f"luksctl reencrypt ended (exit {command.returncode}) within {CUT_AFTER_SECONDS} s: nothing to cut mid-way")
    write_notes({**notes, "cut": f"{CUT_AFTER_SECONDS} s after the device stack appeared"})
    Path("/proc/sys/kernel/sysrq").write_text("1\n")
    Path("/proc/sysrq-trigger").write_text("b\n")  # reboots at once: no sync, no unmount
    time.sleep(60)
    sys.exit("still running 60 s after sysrq b")


if __name__ == "__main__":
    sys.exit(main())
