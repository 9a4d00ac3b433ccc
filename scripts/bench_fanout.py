"""Front end's fan-out alone, on the host: 1, 4 and 16 workers that each take a fixed time.

The VM benchmark (scripts/bench_cluster.py) runs every worker in one 2-vCPU guest, so its
16-worker figure is bounded by 16 gunicorns and 16 remounts sharing two emulated CPUs. On a
real cluster each worker is its own machine. This isolates what the front end controls:
luksctl.api.cluster.remount_workers() against N HTTPS servers on loopback (TLS verified against
their CA, the cluster token sent) whose answer takes WORKER_SECONDS, standing in for a
worker's remount on its own CPU. Parallel fan-out keeps the time near WORKER_SECONDS at
every N. Results: stdout and vm-out/bench_fanout.json.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from luksctl.api import certs, cluster

LEVELS = (1, 4, 16)
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
WORKER_SECONDS = float(os.environ.get("BENCH_WORKER_SECONDS", "1.0"))
PORT = 15443


class Worker(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        time.sleep(WORKER_SECONDS)
        body = b'{"nfs_state": "mounted"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_workers(hosts: list[str], cert: Path, key: Path) -> list[http.server.ThreadingHTTPServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    servers = []
    for host in hosts:
        server = http.server.ThreadingHTTPServer((host, PORT), Worker)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    return servers


def main() -> int:
    hosts = [f"127.0.0.{i}" for i in range(2, 2 + max(LEVELS))]
    results: dict = {"worker_seconds": WORKER_SECONDS, "runs": RUNS, "cpus": os.cpu_count(), "fan_out": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_pem, key_pem = certs.build_certificate(["localhost"], {ipaddress.ip_address(h) for h in hosts}, days=1)
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        servers = start_workers(hosts, cert, key)
        client = cluster.WorkerClient(scheme="https", port=PORT, verify=str(cert), connect_timeout=5,
                                      read_timeout=60, token="bench-token")
        try:
            for level in LEVELS:
                times = []
                for _ in range(RUNS):
                    started = time.perf_counter()
                    nodes = cluster.remount_workers(client, hosts[:level])
                    times.append(time.perf_counter() - started)
                    assert set(nodes.values()) == {"mounted"}, nodes
                results["fan_out"][level] = {"median_s": statistics.median(times), "runs_s": times}
                print(f"{level:2} workers: {statistics.median(times):.3f} s (median of {RUNS})", flush=True)
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
    one, sixteen = results["fan_out"][1]["median_s"], results["fan_out"][16]["median_s"]
    results["ratio_16_to_1"] = sixteen / one
    print(f"ratio 16/1: {sixteen / one:.3f}x (each worker takes {WORKER_SECONDS} s)")
    out = Path(os.environ.get("VM_OUT", REPO / "vm-out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_fanout.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
