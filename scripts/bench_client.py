"""`luksctl-client status` over N hosts, N = 1, 8, 32 (issue 23): its wall time against one host's.

The hosts are local: one gunicorn (the front end with the fake bridge, tests/support/fake_frontend.py)
behind 32 nginx processes, each on its own port with the configuration `luksctl-api proxy-config`
writes (tests/support/serving.py, as the host tests). Every port counts as a host with its own
TLS handshake and its own pinned certificate. Each N runs BENCH_RUNS times (after one run that
records the certificates); the wall time is the whole command, interpreter start included, as a
user sees it. Runs as root (nginx's workers drop to `daemon`). Prints a Markdown table.

usage: bench_client.py        knobs: BENCH_RUNS (10), BENCH_LEVELS ("1 8 32")
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.serving import running_stack  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "10"))
LEVELS = tuple(int(n) for n in os.environ.get("BENCH_LEVELS", "1 8 32").split())
CLIENT = Path(sys.executable).parent / "luksctl-client"


def timed_status(hosts: list[str], known_hosts: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([str(CLIENT), "--known-hosts", str(known_hosts), "status", "--json", *hosts],
                          capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"luksctl-client status failed ({done.returncode}): {done.stdout}{done.stderr}")
    return took


def main() -> None:
    with running_stack("luksctl-bench-client.", fake_volume=True, nginx_ports=max(LEVELS)) as stack:
        known_hosts = stack.directory / "known_hosts"
        hosts = [f"127.0.0.1:{port}" for port in stack.ports]
        timed_status(hosts, known_hosts)  # records every certificate once
        results = {n: [timed_status(hosts[:n], known_hosts) for _ in range(RUNS)] for n in LEVELS}

    one = statistics.median(results[LEVELS[0]])
    print(f"luksctl-client status, {RUNS} runs per N, local nginx+gunicorn, {os.cpu_count()} CPUs, {platform.python_implementation()} "
          f"{platform.python_version()}\n")
    print(f"| hosts (N) | median wall (s) | min (s) | max (s) | median / N={LEVELS[0]} |")
    print("|---:|---:|---:|---:|---:|")
    for n, times in results.items():
        median = statistics.median(times)
        print(f"| {n} | {median:.3f} | {min(times):.3f} | {max(times):.3f} | {median / one:.2f}x |")


if __name__ == "__main__":
    main()
