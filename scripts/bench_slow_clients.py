"""Status while slow and hostile clients attack, natively or in the VM (issue 20).

Each attack of tests/vm/faults_lab.ATTACKS (the review's sizes: 120 connections trickling a
chunked body one byte every 0.2 s from a refused address, the same from an allowed one, 2,000
idle connects from a refused address, 64 trickled TLS handshakes) against each serving
configuration of scripts/bench_status.py ("proxy" as deployed; "direct-old-worker", the tree
before issue 20, with BENCH_OLD_TREE), while status is polled from 127.0.0.1 with a new TLS
connection per poll. ALLOWED_CLIENTS: 127.0.0.1 and 127.0.0.2. Runs as root.
Results: stdout (a Markdown table) and vm-out/bench_slow_clients[_host].json.

usage: bench_slow_clients.py [CONFIG...]   (default: every configuration bench_status.py has)
knobs: BENCH_SECONDS (20), BENCH_OLD_TREE
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "vm"))

import bench_status  # noqa: E402  (scripts/, this script's own directory)
import faults_lab  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "20"))
ALLOWED = {"ALLOWED_CLIENTS": ["127.0.0.1/32", "127.0.0.2/32"]}


def attack(name: str, url: str) -> dict:
    groups, interval = faults_lab.ATTACKS[name]
    latencies, failures, held = [], [], []
    with faults_lab.SlowClients(groups, interval) as slow:
        slow.all_connected.wait(120)
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            held.append(slow.open_count())
            try:
                answer = faults_lab.https("GET", bench_status.STATUS, port=bench_status.PORT, timeout=10)
                assert answer.status == 200, answer
                latencies.append(answer.elapsed)
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc)[:200])
        connect_failures = slow.connect_failures
    latencies.sort()
    return {"polls": len(latencies), "failed_polls": len(failures),
            "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else None,
            "max_ms": latencies[-1] * 1000 if latencies else None,
            "attack_connections_held": [min(held), max(held)], "attack_connect_failures": connect_failures,
            "first_failures": failures[:3]}


def main(configs: list[str]) -> int:
    faults_lab.API_PORT = bench_status.PORT  # SlowClients connects to faults_lab.API_PORT
    bench_status.OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"seconds": SECONDS, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        subprocess.run([str(Path(sys.executable).with_name("luksctl-api")), "gen-cert", "--owner", "root",
                        "--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem")],
                       check=True, capture_output=True)
        for config in configs or bench_status.CONFIGS:
            results["configs"][config] = {}
            for name in faults_lab.ATTACKS:
                with bench_status.serving(config, workdir, ALLOWED) as url:
                    figures = attack(name, url)
                results["configs"][config][name] = figures
                print(f"{config:18} {name:40} {figures}", flush=True)
    out = bench_status.OUT / ("bench_slow_clients.json" if bench_status.IN_VM else "bench_slow_clients_host.json")
    out.write_text(json.dumps(results, indent=2))
    print("\n| configuration | attack | failed polls | p50 / p99 / max ms |\n|---|---|---|---|")
    for config, by_attack in results["configs"].items():
        for name, r in by_attack.items():
            timing = " / ".join("-" if r[k] is None else f"{r[k]:.0f}" for k in ("p50_ms", "p99_ms", "max_ms"))
            print(f"| {config} | {name} | {r['failed_polls']} of {r['polls'] + r['failed_polls']} | {timing} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
