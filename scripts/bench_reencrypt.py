"""`make bench BENCH=bench_reencrypt`: online re-encryption on the real kernel in the VM (issue 22).

Runs inside the VM as root, on a mounted LUKS2 volume of REENCRYPT_MIB (default 256) on a loop
device, with the passphrase on stdin (no Vault: its exchange is not what is measured). Each round,
the order of the first two alternating between rounds:
- `luksctl reencrypt` online, against plain `cryptsetup reencrypt --active-name` with the same
  options on the same volume: wall time each, and their ratio (luksctl's own cost: start-up, the
  lock, the header reads, the backup it rewrites);
- a writer (256 KiB files, each fsynced) alone for WRITER_SECONDS, then during a `luksctl
  reencrypt`: its throughput idle and during;
- `luksctl reencrypt` SIGKILLed (with its cryptsetup) once its device stack is up, then run again:
  the re-run's wall time, and the cost of the kill (killed run + re-run - an uninterrupted run).
With REENCRYPT_RATIO_ONLY=1 a round is the first two runs only (at 1 GiB, about 8 minutes instead of 15).
Results: stdout (Markdown) and vm-out/bench_reencrypt.json. For sizes over 512 MiB, attach a disk
for the images (each round keeps its own until the end: ROUNDS x REENCRYPT_MIB, plus room), made
with every block allocated on the host, or the first round also pays for the host's allocation:
fallocate -l 6G FILE; VM_DISK=FILE make bench BENCH="REENCRYPT_DISK=/dev/vda REENCRYPT_MIB=1024 ...".
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))

from helpers_vm import CRYPTSETUP, MOUNTPOINT, OUT, SERVICE_PATH, VolumeFactory, mapped, put_back_closed, run  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SIZE_MIB = int(os.environ.get("REENCRYPT_MIB", "256"))
WRITER_SECONDS = float(os.environ.get("WRITER_SECONDS", "10"))
RATIO_ONLY = os.environ.get("REENCRYPT_RATIO_ONLY") == "1"
# A virtual disk (vm-run.sh's VM_DISK, /dev/vda in the guest) for the volume's image: beyond
# 512 MiB an image in the guest's RAM-backed /srv crowds its 2 GiB of memory.
IMAGE_DISK = os.environ.get("REENCRYPT_DISK")
LUKSCTL = "/usr/local/sbin/luksctl"
FAST_SLOT = ["--pbkdf", "pbkdf2", "--iter-time", "1"]  # the keyslot's cost is not what is measured
PASSPHRASE = b"bench reencrypt passphrase"


def sized_volume(volumes: VolumeFactory):
    """The factory's volume, grown to SIZE_MIB (loop and LUKS resized, the filesystem made again), mounted."""
    volume = volumes(PASSPHRASE)
    # Written, not a sparse extension: the first run would otherwise also pay for allocating
    # every block of the image, and the runs it is compared with would not.
    with volume.image.open("r+b") as image:
        image.seek(0, os.SEEK_END)
        zeros = bytes(1 << 20)
        while image.tell() < SIZE_MIB << 20:
            image.write(zeros[:(SIZE_MIB << 20) - image.tell()])
        os.fsync(image.fileno())
    run("losetup", "--set-capacity", volume.loop)
    run(CRYPTSETUP, "open", "--key-file=-", volume.loop, volume.cryptdev, input=PASSPHRASE)
    run("mkfs.ext4", "-q", "-F", volume.mapper)
    run("mount", volume.mapper, str(MOUNTPOINT))
    return volume


def timed(argv: list[str]) -> float:
    # Each run starts from the same cold page cache: on a disk-backed image the second of two runs
    # would otherwise read what the first left cached. Only the images' filesystem is synced: after
    # the kill the volume's own device is suspended, and a plain sync waited on it for good.
    run("sync", "--file-system", str(VolumeFactory.workdir))
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    started = time.monotonic()
    done = subprocess.run(argv, input=PASSPHRASE, capture_output=True, env={"PATH": SERVICE_PATH}, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {done.returncode}: {done.stdout[-500:]!r} {done.stderr[-1000:]!r}")
    return time.monotonic() - started


def luksctl_reencrypt() -> float:
    return timed([LUKSCTL, "reencrypt", *FAST_SLOT])


def cryptsetup_reencrypt(volume) -> float:
    return timed([CRYPTSETUP, "reencrypt", "--batch-mode", "--key-file=-", *FAST_SLOT, "--active-name", volume.cryptdev])


class Writer(threading.Thread):
    """Writes 256 KiB files, each fsynced, into MOUNTPOINT/writer; counts bytes until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopping, self.written, self.seconds = threading.Event(), 0, 0.0

    def run(self) -> None:
        directory = MOUNTPOINT / "writer"
        directory.mkdir(exist_ok=True)
        block, started, number = os.urandom(256 << 10), time.monotonic(), 0
        while not self.stopping.is_set():
            with open(directory / f"{number % 64:02d}", "wb") as stream:  # 16 MiB at most on the volume
                stream.write(block)
                stream.flush()
                os.fsync(stream.fileno())
            self.written += len(block)
            number += 1
        self.seconds = time.monotonic() - started

    def mib_per_second(self) -> float:
        self.stopping.set()
        self.join(120)
        return self.written / self.seconds / (1 << 20)


def writer_idle_then_during() -> tuple[float, float, float]:
    idle = Writer()
    idle.start()
    time.sleep(WRITER_SECONDS)
    idle_rate = idle.mib_per_second()
    during = Writer()
    during.start()
    seconds = luksctl_reencrypt()
    return idle_rate, during.mib_per_second(), seconds


def killed_then_rerun(volume) -> tuple[float, float]:
    """(seconds until the kill, seconds of the re-run that recovers and finishes)."""
    started = time.monotonic()
    command = subprocess.Popen([LUKSCTL, "reencrypt", *FAST_SLOT], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={"PATH": SERVICE_PATH}, start_new_session=True)
    command.stdin.write(PASSPHRASE)
    command.stdin.close()
    while not mapped(f"{volume.cryptdev}-overlay"):
        if command.poll() is not None:
            raise RuntimeError(f"luksctl reencrypt ended (exit {command.returncode}) before its device stack was seen")
        time.sleep(0.01)
    time.sleep(2)  # into the data, past the first hotzone
    os.killpg(command.pid, signal.SIGKILL)
    command.wait(60)
    killed_after = time.monotonic() - started
    return killed_after, luksctl_reencrypt()


# (result key, table heading, unit) in the order of the table
COLUMNS = [("luksctl_s", "luksctl", " s"), ("cryptsetup_s", "cryptsetup", " s"), ("ratio", "ratio", ""),
           ("writer_idle_mib_s", "writer idle", " MiB/s"), ("writer_during_mib_s", "writer during", " MiB/s"),
           ("luksctl_with_writer_s", "luksctl with writer", " s"), ("killed_after_s", "killed after", " s"),
           ("rerun_s", "re-run", " s"), ("kill_cost_s", "kill cost", " s")]


def one_round(volumes: VolumeFactory, number: int) -> dict:
    volume = sized_volume(volumes)
    try:
        runs = {"luksctl": luksctl_reencrypt, "cryptsetup": lambda: cryptsetup_reencrypt(volume)}
        order = ["luksctl", "cryptsetup"][::-1 if number % 2 else 1]
        seconds = {name: runs[name]() for name in order}
        print(f"round {number + 1}: luksctl {seconds['luksctl']:.2f} s, cryptsetup {seconds['cryptsetup']:.2f} s", flush=True)
        result = {"luksctl_s": round(seconds["luksctl"], 2), "cryptsetup_s": round(seconds["cryptsetup"], 2),
                  "ratio": round(seconds["luksctl"] / seconds["cryptsetup"], 3)}
        if RATIO_ONLY:
            return result
        idle_rate, during_rate, with_writer = writer_idle_then_during()
        killed_after, rerun = killed_then_rerun(volume)
        return {**result, "writer_idle_mib_s": round(idle_rate, 2), "writer_during_mib_s": round(during_rate, 2),
                "luksctl_with_writer_s": round(with_writer, 2),
                "killed_after_s": round(killed_after, 2), "rerun_s": round(rerun, 2),
                "kill_cost_s": round(killed_after + rerun - seconds["luksctl"], 2)}
    finally:
        put_back_closed(volume)


def main() -> int:
    MOUNTPOINT.mkdir(parents=True, exist_ok=True)
    volumes = VolumeFactory()
    if IMAGE_DISK:
        run("mkfs.ext4", "-q", "-F", IMAGE_DISK)
        volumes.workdir.mkdir(parents=True, exist_ok=True)
        run("mount", IMAGE_DISK, str(volumes.workdir))
    try:
        rounds = [one_round(volumes, n) for n in range(ROUNDS)]
    finally:
        volumes.cleanup()
    median = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_reencrypt.json").write_text(json.dumps({"size_mib": SIZE_MIB, "rounds": rounds, "median": median}, indent=1))
    print(f"\nOnline re-encryption of a mounted {SIZE_MIB} MiB LUKS2 volume (aes-xts-plain64), {ROUNDS} rounds:\n")
    columns = [column for column in COLUMNS if column[0] in median]
    print("| round | " + " | ".join(title for _, title, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for number, r in enumerate([*rounds, median]):
        label = number + 1 if number < ROUNDS else "median"
        print(f"| {label} | " + " | ".join(f"{r[key]}{unit}" for key, _, unit in columns) + " |")
    per_gib = median["luksctl_s"] * 1024 / SIZE_MIB
    print(f"\nluksctl reencrypt online: {per_gib:.0f} s per GiB (median, scaled from {SIZE_MIB} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
