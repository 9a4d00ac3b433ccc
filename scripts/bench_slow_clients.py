"""Status while slow clients trickle, natively or in the VM (issue 10, item 6).

The load of the VM test test_slow_clients_do_not_block_status (tests/vm/faults_lab.SlowClients:
32 connections trickling a TLS ClientHello and 32 a request head from 127.0.0.1, 16 more from
127.0.0.2 outside ALLOWED_CLIENTS, one byte every 2 s each) against the front end started as
scripts/bench_status.py starts it, while status is polled with a new TLS connection per poll.
Runs as root. Results: stdout and vm-out/bench_slow_clients[_host].json.

usage: bench_slow_clients.py [gunicorn arguments...]   e.g. --worker-class gthread (the old way)
knobs: BENCH_SECONDS (20)
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
GROUPS = [("127.0.0.1", "handshake", 32), ("127.0.0.1", "headers", 32), ("127.0.0.2", "headers", 16)]


def main(extra: list[str]) -> int:
    faults_lab.API_PORT = bench_status.PORT  # SlowClients connects to faults_lab.API_PORT
    bench_status.OUT.mkdir(parents=True, exist_ok=True)
    latencies, failures, held = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp:
        workdir = Path(tmp)
        subprocess.run([str(Path(sys.executable).with_name("luksctl-api")), "gen-cert", "--owner", "root",
                        "--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem")],
                       check=True, capture_output=True)
        config = bench_status.write_config(workdir, tls=True)
        config.write_text(json.dumps({**json.loads(config.read_text()), "ALLOWED_CLIENTS": ["127.0.0.1/32"]}))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": tmp,
               "LUKSCTL_API_CONFIG": str(config)}
        proc = subprocess.Popen(bench_status.serving_argv(workdir, extra, tls=True), env=env, cwd="/",
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            bench_status.wait_answering(f"https://127.0.0.1:{bench_status.PORT}{bench_status.STATUS}", proc)
            with faults_lab.SlowClients(GROUPS) as slow:
                slow.all_connected.wait(60)
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
        finally:
            proc.terminate()
            proc.wait(60)
            bench_status.wait_port_free()
    latencies.sort()
    figures = {"gunicorn_extra_args": extra, "seconds": SECONDS, "polls": len(latencies), "failed_polls": len(failures),
               "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
               "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else None,
               "slow_connections_held": [min(held), max(held)], "slow_connect_failures": connect_failures,
               "first_failures": failures[:3]}
    name = "bench_slow_clients.json" if bench_status.IN_VM else "bench_slow_clients_host.json"
    (bench_status.OUT / name).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
