"""Status throughput under concurrency, per serving configuration, natively or in the VM.

Issue 20: the deployment puts nginx (luksctl-proxy@.service) in front of stock gunicorn on a
Unix socket. This serves status several ways, side by side on ports PORT, PORT+1, ..., and
measures each the same way:
- "proxy": as deployed: the unit's ExecStart on its socket, with its PROMETHEUS_MULTIPROC_DIR,
  behind nginx with the configuration `luksctl-api proxy-config` writes (TLS at nginx);
- "proxy-no-metrics" (issue 23): the same with config METRICS false (no /metrics, no hook);
- "direct": the same gunicorn on a TCP port with TLS, no proxy;
- "direct-old-worker": with BENCH_OLD_TREE=<a checkout of the tree before issue 20>, that tree's
  unit and gunicorn.conf.py (our own event-loop worker), the deployment the proxy replaced.
wrk (C, little CPU) runs 1, 8, 32 and 64 connections per configuration, each for BENCH_SECONDS
after BENCH_WARMUP seconds. At each level, BENCH_ROUNDS rounds run one window per configuration
in turn, the order reversed every other round: on a shared machine the other load then falls on
every configuration alike, and the tables give each figure's median (lowest-highest) and, per
round, each configuration's rate against the first one named.

Two rates per window: wrk's own (requests over the whole run, the connections' TLS
handshakes included) and the steady rate (scripts/wrk_steady.lua: only responses after the
warm-up, when every connection is open).

The scrape duration of "proxy"'s /metrics, after the status windows, BENCH_ROUNDS times: first
BENCH_FAILED_OPENS (50) failed opens (half malformed, half with a Vault that refuses connections)
fill the open counters and the Vault histograms, then BENCH_SCRAPE_SECONDS (10) of back-to-back
scrapes on one kept-alive connection, as Prometheus scrapes, give p50 / p99.

The volume description points at a device that does not exist, so status reads
/proc/self/mountinfo and /sys/block/dm-*/dm/name and answers "unmounted": the same work as a
poll of a real volume. Runs as root. Results: stdout (a Markdown table) and
vm-out/bench_status.json (VM) or vm-out/bench_status_host.json (host).

usage: bench_status.py [CONFIG...]   (default: BENCH_CONFIGS, else every configuration available)
knobs: BENCH_SECONDS (20), BENCH_WARMUP (10), BENCH_LEVELS ("1 8 32 64"), BENCH_ROUNDS (1), BENCH_OLD_TREE,
       BENCH_SCRAPE_SECONDS (10; 0 skips the scrapes), BENCH_FAILED_OPENS (50)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

import wrk_output  # noqa: E402
from support.serving import Serving, installed  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "20"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "10"))
LEVELS = tuple(int(n) for n in os.environ.get("BENCH_LEVELS", "1 8 32 64").split())
SCRAPE_SECONDS = int(os.environ.get("BENCH_SCRAPE_SECONDS", "10"))
FAILED_OPENS = int(os.environ.get("BENCH_FAILED_OPENS", "50"))
OLD_TREE = Path(os.environ["BENCH_OLD_TREE"]) if os.environ.get("BENCH_OLD_TREE") else None
PORT = 15000
STATUS = "/luksctl_api/v1.0/status"
OPEN = "/luksctl_api/v1.0/open"
METRICS = "/metrics"
NO_VAULT = "https://127.0.0.1:9"  # refuses connections: an open fails at once, in the Vault stage
IN_VM = "LUKSCTL_VM_OUT" in os.environ
# On the host, next to the VM's results (as bench_fanout.py), but under a name of its own.
OUT = Path(os.environ["LUKSCTL_VM_OUT"] if IN_VM else os.environ.get("VM_OUT", REPO / "vm-out"))
RESULT = OUT / ("bench_status.json" if IN_VM else "bench_status_host.json")
CONFIGS = ["proxy", "proxy-no-metrics", "direct"] + (["direct-old-worker"] if OLD_TREE else [])


def unit_argv(tree: Path) -> list[str]:
    for line in (tree / "deploy" / "luksctl-api.service").read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise SystemExit(f"no ExecStart= in {tree}/deploy/luksctl-api.service")


def gunicorn_argv(workdir: Path, bind: str, tls: bool, tree: Path = REPO) -> list[str]:
    """The unit's command line with this machine's paths: its config, `bind`, TLS or not."""
    argv = unit_argv(tree)
    app = argv.pop()
    argv[0] = installed("gunicorn")
    replaced = {"--config": str(tree / "deploy" / "gunicorn.conf.py"), "--bind": bind}
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--certfile", "--keyfile"):
            skip = True
        elif arg in replaced:
            skip = True
            out += [arg, replaced[arg]]
        else:
            out.append(arg)
    if tls:
        out += ["--certfile", str(workdir / "cert.pem"), "--keyfile", str(workdir / "key.pem")]
    return out + [app]


@contextlib.contextmanager
def serving(name: str, workdir: Path, config: dict | None = None, port: int = PORT) -> Iterator[str]:
    """Status served as `name` on 127.0.0.1:`port` over TLS, from its own directory; yields its URL."""
    wait_port_free(port)  # else a server left behind would answer in this one's place
    directory = workdir / name
    directory.mkdir(exist_ok=True)
    metrics = {} if name == "direct-old-worker" else {"METRICS": name != "proxy-no-metrics"}  # the old tree has no METRICS key
    config_file = write_config(directory, {"VAULT_URL_ALLOWLIST": [NO_VAULT], **metrics, **(config or {})})
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(directory)}
    stack = Serving(directory, config_file, env=env, ready_timeout=600)
    log = OUT / f"bench.{name}{'' if IN_VM else '.host'}.log"
    try:
        if name in ("proxy", "proxy-no-metrics"):
            gunicorn_env = {**stack.env, "PROMETHEUS_MULTIPROC_DIR": str(directory / "run" / "metrics")}  # as the unit sets it
            sockets = directory / "sockets"
            sockets.mkdir(exist_ok=True)
            socket_path = sockets / "gunicorn.sock"
            stack.start_gunicorn(gunicorn_argv(workdir, f"unix:{socket_path}", tls=False), socket_path, log, env=gunicorn_env)
            stack.start_nginx("nginx", socket_path, port, cert=workdir / "cert.pem", key=workdir / "key.pem", user="root", log=log)
        elif name == "direct":
            stack.start(gunicorn_argv(workdir, f"127.0.0.1:{port}", tls=True), log)
        elif name == "direct-old-worker":
            stack.start(gunicorn_argv(workdir, f"127.0.0.1:{port}", tls=True, tree=OLD_TREE), log,
                        env={**stack.env, "PYTHONPATH": str(OLD_TREE / "src")})
        else:
            raise SystemExit(f"no configuration {name!r}: {CONFIGS}")
        url = f"https://127.0.0.1:{port}{STATUS}"
        wait_answering(url, stack.processes)
        yield url
    finally:
        stack.stop()
        wait_port_free(port)


def write_config(workdir: Path, extra: dict) -> Path:
    ini = workdir / "luks-cryptdev.ini"
    ini.write_text("[luks]\nuuid = 0b2e6f5e-0000-4000-8000-00000000b0b0\ncryptdev = benchvol\n"
                   "mountpoint = /srv/bench-status\nfilesystem = ext4\n")
    runtime = workdir / "run"  # the service's private directory (lock, failed-open counter)
    runtime.mkdir(mode=0o700, exist_ok=True)
    config = workdir / "config.json"
    config.write_text(json.dumps({"CRYPTDEV_INI": str(ini), "LOCK_FILE": str(runtime / "open.lock"), **extra}))
    return config


def wait_answering(url: str, processes: list[subprocess.Popen], timeout: float = 600) -> None:
    """A loaded host can make the VM take minutes to import the app."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}")
        answer = subprocess.run(["curl", "-sk", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url], capture_output=True, text=True)
        if answer.returncode == 0 and answer.stdout == "200":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not answering after {timeout} s")


def wait_port_free(port: int) -> None:
    for _ in range(120):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} still taken")


def run_wrk(url: str, connections: int, seconds: int, warmup: int) -> dict:
    out = subprocess.run(["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{warmup + seconds}s", "--timeout", "60s",
                          "--latency", "-s", str(REPO / "scripts" / "wrk_steady.lua"), url,
                          "--", str(warmup)], capture_output=True, text=True, check=True).stdout
    figures = wrk_output.parse(out)
    return {k: figures.get(k, 0.0) for k in ("rps", "steady_rps", "p50_ms", "p99_ms", "failed_requests")}


def measure(names: list[str], workdir: Path) -> dict:
    """Every configuration served side by side (PORT, PORT+1, ...): at each level each round runs one
    window per configuration, in turn, the order reversed every other round, so that what else
    loads the machine falls on all of them alike."""
    results: dict = {name: {level: [] for level in LEVELS} for name in names}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(serving(name, workdir, port=PORT + i)) for i, name in enumerate(names)}
        for level in LEVELS:
            for round_ in range(ROUNDS):
                for name in names if round_ % 2 == 0 else names[::-1]:
                    results[name][level].append(run_wrk(urls[name], level, SECONDS, WARMUP))
                    print(f"{name:22} c={level:2} round {round_ + 1}: {results[name][level][-1]}", flush=True)
        if "proxy" in urls and SCRAPE_SECONDS:
            results["proxy"]["scrape"] = [measure_scrape(urls["proxy"].removesuffix(STATUS)) for _ in range(ROUNDS)]
            print(f"{'proxy':22} scrapes: {results['proxy']['scrape']}", flush=True)
    return results


def measure_scrape(base: str) -> dict:
    """Scrapes of /metrics one after another on one connection, once failed opens filled its counters."""
    for n in range(FAILED_OPENS):
        body = "{}" if n % 2 else json.dumps({"vault_url": NO_VAULT, "vault_token": "t", "secret_root": "s", "secret_path": "p",
                                               "secret_key": "k"})
        subprocess.run(["curl", "-sk", "-m", "10", "-o", "/dev/null", "-H", "Content-Type: application/json",
                        "--data-binary", body, base + OPEN], check=True)
    text = subprocess.run(["curl", "-sk", "-m", "10", base + METRICS], capture_output=True, text=True, check=True).stdout
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {**run_wrk(base + METRICS, 1, SCRAPE_SECONDS, 2), "bytes": len(text.encode()), "samples": len(samples)}


def spread(values: list[float]) -> str:
    """The median, with the lowest and highest when there are several."""
    def figure(x: float) -> str:
        return f"{x:,.2f}" if x < 10 else f"{x:,.0f}"

    median = figure(statistics.median(values))
    return median if len(values) == 1 else f"{median} ({figure(min(values))}-{figure(max(values))})"


def main(names: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    names = names or CONFIGS
    where = "VM (software emulation)" if IN_VM else f"host ({os.cpu_count()} CPUs, {platform.release()})"
    results: dict = {"where": where, "seconds_per_window": SECONDS, "warmup_seconds": WARMUP, "rounds": ROUNDS}
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        workdir = Path(tmp)
        subprocess.run([installed("luksctl-api"), "gen-cert", "--owner", "root",
                        "--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem")],
                       check=True, capture_output=True)
        workdir.chmod(0o755)
        results["configs"] = measure(names, workdir)
    RESULT.write_text(json.dumps(results, indent=2))
    print(f"\n{where}, {ROUNDS} round(s) of {SECONDS} s after {WARMUP} s of warm-up; median (lowest-highest) "
          "steady req/s, then median p50 / p99 ms\n")
    print("| configuration | " + " | ".join(f"{n} clients" for n in LEVELS) + " |")
    print("|---|" + "---|" * len(LEVELS))
    for name in names:
        cells = []
        for level in LEVELS:
            windows = results["configs"][name][level]
            failed = sum(w["failed_requests"] for w in windows)
            cells.append(f"{spread([w['steady_rps'] for w in windows])} ({statistics.median(w['p50_ms'] for w in windows):.0f} / "
                         f"{statistics.median(w['p99_ms'] for w in windows):.0f})" + (f", {failed} failed" if failed else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    first = names[0]
    for name in names[1:]:  # each round's windows ran back to back: compare them pairwise
        ratios = [spread([mine["steady_rps"] / theirs["steady_rps"] for mine, theirs in zip(results["configs"][first][level],
                                                                                           results["configs"][name][level])])
                  for level in LEVELS]
        print(f"| {first} / {name}, per round | " + " | ".join(ratios) + " |")
    if scrapes := results["configs"].get("proxy", {}).get("scrape"):
        print(f"\n/metrics through the proxy, {len(scrapes)} x {SCRAPE_SECONDS} s of back-to-back scrapes "
              f"({scrapes[0]['samples']} samples, {scrapes[0]['bytes']:,} bytes): scrapes/s {spread([s['steady_rps'] for s in scrapes])}, "
              f"p50 ms {spread([s['p50_ms'] for s in scrapes])}, p99 ms {spread([s['p99_ms'] for s in scrapes])}, "
              f"{sum(s['failed_requests'] for s in scrapes)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or os.environ.get("BENCH_CONFIGS", "").split()))
