"""Cluster open fan-out: the worker part of an open with 1, 4 and 16 worker hosts.

Runs inside the VM as root, like scripts/bench.py, on the lab of tests/vm/cluster/cluster_lab.py:
real network namespaces, the real kernel NFS server, luksctl-api-wn started as its unit does.
It times luksctl.api.cluster.remount_workers(), the call the front end makes after a mount:

- "mounted": every worker already has its share; each answers at once. Pure fan-out cost
  (TLS + HTTP to N hosts in parallel).
- "remount": every worker really remounts (sudo + the luksctl interpreter + mount.nfs). On the
  VM's 2 vCPUs this is CPU-bound: N remounts share 2 CPUs, so expect roughly N/2 times one.

Medians over BENCH_RUNS runs (default 3; "mounted" uses 5). Software emulation makes every
absolute time slow: compare the ratios. Results: stdout and vm-out/bench_cluster.json.

Memory: the VM has 2 GiB. 16 workers with the unit's `--workers 2` are 48 Python processes;
BENCH_WN_GUNICORN_WORKERS (default 1) lowers --workers for this benchmark only, and the
figures say which was used.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vm" / "cluster"))
sys.path.insert(0, str(REPO / "tests" / "vm"))

from cluster_lab import CA_BUNDLE, MOUNTPOINT, SYSTEMCTL, Lab  # noqa: E402
from helpers_vm import CRYPTSETUP, OUT, VolumeFactory, run  # noqa: E402

from luksctl.api import cluster  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
MOUNTED_RUNS = max(RUNS, 5)
LEVELS = (1, 4, 16)
GUNICORN_WORKERS = int(os.environ.get("BENCH_WN_GUNICORN_WORKERS", "1")) or None
PASSPHRASE = "bench cluster passphrase"


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def timed(action) -> tuple[float, dict]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    lab = Lab(max(LEVELS), gunicorn_workers=GUNICORN_WORKERS)
    volumes = VolumeFactory()
    results: dict = {
        "runs": RUNS,
        "mounted_runs": MOUNTED_RUNS,
        "gunicorn_workers_per_node": GUNICORN_WORKERS or "unit default (2)",
        "cpus": os.cpu_count(),
    }
    try:
        results["mem_available_mib_before"] = mem_available_mib()
        started = time.perf_counter()
        lab.setup()
        results["lab_setup_s"] = time.perf_counter() - started
        results["mem_available_mib_with_workers"] = mem_available_mib()
        print(f"lab of {len(lab.workers)} workers up in {results['lab_setup_s']:.0f} s; "
              f"MemAvailable {results['mem_available_mib_with_workers']} MiB", flush=True)

        # The front end's part of an open, done directly: LUKS open, mount, NFS server restart.
        volume = volumes(PASSPHRASE)
        run(CRYPTSETUP, "open", "--key-file=-", str(volume.by_uuid), volume.cryptdev, input=volume.passphrase)
        run("mount", "-t", "ext4", volume.mapper, str(MOUNTPOINT))
        run(str(SYSTEMCTL), "restart", "nfs-kernel-server")

        client = cluster.WorkerClient(scheme="https", port=5000, verify=str(CA_BUNDLE), connect_timeout=5,
                                      read_timeout=600, token=lab.token)
        figures: dict = {}
        for level in LEVELS:
            hosts = lab.ips[:level]
            nodes = lab.workers[:level]
            remounts = []
            for _ in range(RUNS):
                for node in nodes:
                    node.umount_nfs()
                seconds, states = timed(lambda: cluster.remount_workers(client, hosts))
                assert set(states.values()) == {"mounted"}, states
                remounts.append(seconds)
            mounted = []
            for _ in range(MOUNTED_RUNS):
                seconds, states = timed(lambda: cluster.remount_workers(client, hosts))
                assert set(states.values()) == {"mounted"}, states
                mounted.append(seconds)
            status = []
            for _ in range(MOUNTED_RUNS):
                seconds, states = timed(lambda: cluster.worker_states(client, hosts))
                assert set(states.values()) == {"mounted"}, states
                status.append(seconds)
            figures[level] = {
                "remount_median_s": statistics.median(remounts),
                "remount_runs_s": remounts,
                "mounted_median_s": statistics.median(mounted),
                "mounted_runs_s": mounted,
                "status_median_s": statistics.median(status),
            }
            print(f"{level:2} workers: remount {figures[level]['remount_median_s']:7.2f} s   "
                  f"already mounted {figures[level]['mounted_median_s']:6.3f} s   "
                  f"status {figures[level]['status_median_s']:6.3f} s", flush=True)
        results["fan_out"] = figures
        low, high = figures[LEVELS[0]], figures[LEVELS[-1]]
        results["ratio_16_to_1"] = {
            key: high[f"{key}_median_s"] / max(low[f"{key}_median_s"], 1e-9) for key in ("remount", "mounted", "status")
        }
        print(f"ratio 16/1: remount {results['ratio_16_to_1']['remount']:.1f}x, "
              f"already mounted {results['ratio_16_to_1']['mounted']:.1f}x, "
              f"status {results['ratio_16_to_1']['status']:.1f}x", flush=True)
        (OUT / "bench_cluster.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return 0
    finally:
        lab.teardown()  # workers unmounted and stopped, NFS server stopped: the volume is free
        volumes.cleanup()


if __name__ == "__main__":
    sys.exit(main())
