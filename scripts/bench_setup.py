"""`make bench BENCH=bench_setup`: where `luksctl setup`'s time goes, on the real stack in the VM.

Runs inside the VM as root. Each run: a blank loop device, a fresh write-only wrapping token from
a real OpenBao, then `luksctl setup --wipe --json` with the production defaults (LUKS2,
aes-xts-plain64, 512-bit key, argon2id). setup reports its own split (`seconds` in its result
line: vault, format, wipe, mkfs); the wall time includes the interpreter start and the rest.
Results: stdout (Markdown) and vm-out/bench_setup.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))

from helpers_vm import CRYPTSETUP, MOUNTPOINT, OUT, SERVICE_PATH, VOLUME_INI, run, single_vm_stack  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
DISK_MIB = int(os.environ.get("SETUP_DISK_MIB", "256"))
IMAGE = Path("/srv/luks-test/bench-setup.img")
TOKEN = Path("/run/bench-setup-token")
PARTS = ("vault", "format", "wipe", "mkfs")


def one_run(bao, number: int) -> dict:
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    with IMAGE.open("xb") as f:
        f.truncate(DISK_MIB * 1024 * 1024)
    loop = run("losetup", "--find", "--show", str(IMAGE)).stdout.decode().strip()
    try:
        TOKEN.write_text(bao.write_only_wrapping_token())
        argv = ["/usr/local/sbin/luksctl", "setup", "--device", loop, "--cryptdev", "benchsetup", "--mountpoint", str(MOUNTPOINT),
                "--vault-url", bao.url, "--vault-allow-http", "--secret-path", f"bench/{number}-{time.time_ns()}/storage_encryption",
                "--wrapping-token-file", str(TOKEN), "--wipe", "--json"]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, env={"PATH": SERVICE_PATH}, timeout=1800)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"setup exited {done.returncode}: {done.stdout.decode()} {done.stderr.decode()}")
        result = json.loads(done.stdout.decode().splitlines()[-1])
        return {"wall": round(wall, 3), **result["seconds"]}
    finally:
        run("umount", str(MOUNTPOINT), check=False)
        run(CRYPTSETUP, "close", "benchsetup", check=False)
        run("losetup", "--detach", loop, check=False)
        IMAGE.unlink(missing_ok=True)
        TOKEN.unlink(missing_ok=True)
        for path in (VOLUME_INI, Path("/etc/luks/luks-header.bck"), Path("/etc/luks/luks-header.bck.sha256"),
                     Path("/var/run/fast-luks-encryption.success"),
                     Path("/var/run/fast-luks-volume-setup.success")):
            path.unlink(missing_ok=True)


def main() -> int:
    MOUNTPOINT.mkdir(parents=True, exist_ok=True)
    with single_vm_stack() as (_volumes, bao, _api):
        bao.start()
        runs = [one_run(bao, n) for n in range(RUNS)]
    medians = {part: round(statistics.median(r[part] for r in runs), 3) for part in (*PARTS, "wall")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_setup.json").write_text(json.dumps({"disk_mib": DISK_MIB, "runs": runs, "median": medians}, indent=1))
    print(f"\nluksctl setup --wipe on a {DISK_MIB} MiB loop device, production defaults, median of {RUNS}:\n")
    print("| part | median |\n|---|---|")
    for part in (*PARTS, "wall"):
        print(f"| {part} | {medians[part] * 1000:,.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
