"""Soak: status polling under load with an open/close cycle in the middle, on the real stack.

Inside the VM (as root, like scripts/bench.py): SOAK_SECONDS (180) of `wrk` status polling at
SOAK_CONNECTIONS (64) concurrent HTTPS clients, and, SOAK_CYCLE_AT (0.1) of the way in, an
open through the API (the dashboard's request) followed by `luksctl close`. Under this load and
emulation the cycle took 52 to 87 s: 180 s leaves status-only load on both sides of it.
Reports failed requests (non-2xx and socket errors), latency percentiles, and gunicorn's memory
(sum of VmRSS of master + workers) before, right after the cycle, at peak and at the end. Prints the figures and writes
<results dir>/bench_soak.json. Exits 1 if any request failed, the cycle failed, or a gunicorn
process died or was replaced.

Run it with `make bench BENCH=bench_soak`; a short smoke run:
`make bench BENCH="SOAK_SECONDS=20 bench_soak"`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vm"))

import wrk_output  # noqa: E402  (scripts/, this script's own directory)

SECONDS = int(os.environ.get("SOAK_SECONDS", "180"))
CONNECTIONS = int(os.environ.get("SOAK_CONNECTIONS", "64"))
THREADS = int(os.environ.get("SOAK_THREADS", "2"))
# A request slower than this counts as a socket error (timeout). wrk's default is 2 s.
WRK_TIMEOUT = os.environ.get("SOAK_WRK_TIMEOUT", "30s")
CYCLE_AT = float(os.environ.get("SOAK_CYCLE_AT", "0.1"))
PASSPHRASE = "soak passphrase"
LUKSCTL = "/usr/local/sbin/luksctl"

class RssSampler(threading.Thread):
    """gunicorn's memory once a second, to catch a peak between 'before' and 'after'."""

    def __init__(self, master: int):
        super().__init__(daemon=True)
        self.master = master
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        from faults_lab import gunicorn_pids, rss_kib

        while not self.done.wait(1.0):
            master, workers = gunicorn_pids(self.master)
            self.peak = max(self.peak, rss_kib((master, *workers)))


def soak() -> int:
    import requests
    from faults_lab import gunicorn_pids, rss_kib
    from helpers_vm import OUT, Dashboard, run, single_vm_config, single_vm_stack

    with single_vm_stack() as (volumes, bao, api):
        volume = volumes(PASSPHRASE)
        bao.start()
        secret_path = bao.store_passphrase("soak", volume.uuid, PASSPHRASE)
        api.start(single_vm_config(bao, FAILED_OPEN_LIMIT=0))
        dashboard = Dashboard(api.base_url)
        dashboard.timeout = 600  # an open under this load, under emulation, is slow; a hang still ends
        warmup_errors = []
        for _ in range(4):  # every worker past its first request; failures here are reported too
            try:
                dashboard.status()
            except requests.RequestException as exc:
                warmup_errors.append(f"{exc.__class__.__name__}: {exc}"[:300])

        pids_before = gunicorn_pids(api.pid)
        rss_before = rss_kib((pids_before[0], *pids_before[1]))
        sampler = RssSampler(api.pid)
        sampler.start()
        argv = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--timeout", WRK_TIMEOUT, "--latency",
                f"{api.base_url}/luksctl_api/v1.0/status"]
        print(f"soak: {' '.join(argv)}; open/close cycle at {SECONDS * CYCLE_AT:.0f} s", flush=True)
        started = time.monotonic()
        wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        time.sleep(SECONDS * CYCLE_AT)
        cycle: dict = {"started_s": round(time.monotonic() - started, 1)}
        t = time.monotonic()
        opened = dashboard.open(bao.open_payload(secret_path))
        cycle["open_ms"] = round((time.monotonic() - t) * 1000)
        cycle["open_http_status"] = opened.response.status_code
        cycle["open_state"] = opened.state
        cycle["status_while_open"] = dashboard.status().state
        t = time.monotonic()
        closed = run(LUKSCTL, "close", check=False)
        cycle["close_ms"] = round((time.monotonic() - t) * 1000)
        cycle["close_exit"] = closed.returncode
        cycle["status_after_close"] = dashboard.status().state
        cycle["ended_s"] = round(time.monotonic() - started, 1)
        cycle["inside_load"] = cycle["ended_s"] <= SECONDS
        cycle["ok"] = (opened.state == "mounted" and cycle["status_while_open"] == "mounted"
                       and closed.returncode == 0 and cycle["status_after_close"] == "unmounted")
        print(f"soak: cycle {cycle}", flush=True)
        # After the cycle only status polls run: memory should stay where the cycle left it.
        master, workers = gunicorn_pids(api.pid)
        rss_after_cycle = rss_kib((master, *workers))

        out, err = wrk.communicate(timeout=SECONDS + 300)
        sampler.done.set()
        sampler.join()
        pids_after = gunicorn_pids(api.pid)
        rss_after = rss_kib((pids_after[0], *pids_after[1]))
        status_after = dashboard.status()

        load = wrk_output.parse(out)
        results = {
            "seconds": SECONDS,
            "connections": CONNECTIONS,
            "threads": THREADS,
            "wrk_timeout": WRK_TIMEOUT,
            "wrk_exit": wrk.returncode,
            "status_load": load,
            "cycle": cycle,
            "gunicorn": {
                "pids_before": [pids_before[0], *pids_before[1]],
                "pids_after": [pids_after[0], *pids_after[1]],
                "same_processes": pids_before == pids_after,
                "rss_kib_before": rss_before,
                "rss_kib_after_cycle": rss_after_cycle,
                "rss_kib_peak": max(sampler.peak, rss_before, rss_after),
                "rss_kib_after": rss_after,
                "rss_growth_kib": rss_after - rss_before,
                "rss_growth_after_cycle_kib": rss_after - rss_after_cycle,
            },
            "status_after": status_after.state,
            "warmup_errors": warmup_errors,
        }
        results["ok"] = (wrk.returncode == 0 and load["requests"] > 0 and load["failed_requests"] == 0
                         and cycle["ok"] and results["gunicorn"]["same_processes"])
        (OUT / "bench_soak.json").write_text(json.dumps(results, indent=2))
        print(out, err, sep="\n", flush=True)
        print(json.dumps(results, indent=2))
        print(f"soak: {'OK' if results['ok'] else 'FAILED'}: {load['requests']} requests, "
              f"{load['failed_requests']} failed, p99 {load.get('p99_ms', float('nan')):.1f} ms, "
              f"gunicorn RSS {rss_before} -> {rss_after_cycle} (after the cycle) -> {rss_after} KiB "
              f"(peak {results['gunicorn']['rss_kib_peak']})", flush=True)
        return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(soak())
