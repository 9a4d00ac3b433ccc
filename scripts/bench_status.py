"""Status throughput under concurrency, per serving configuration, natively or in the VM.

Issue 20: the deployment puts nginx (luksctl-proxy@.service) in front of stock gunicorn on a
Unix socket. This serves status three ways, one at a time, and measures each the same way:
- "proxy": as deployed: the unit's ExecStart on its socket, behind nginx with the configuration
  `luksctl-api proxy-config` writes (TLS at nginx);
- "direct": the same gunicorn on a TCP port with TLS, no proxy;
- "direct-old-worker": with BENCH_OLD_TREE=<a checkout of the tree before issue 20>, that tree's
  unit and gunicorn.conf.py (our own event-loop worker), the deployment the proxy replaced.
wrk (C, little CPU) runs 1, 8, 32 and 64 connections per configuration, each for BENCH_SECONDS
after BENCH_WARMUP seconds.

Two rates per window: wrk's own (requests over the whole run, the connections' TLS
handshakes included) and the steady rate (scripts/wrk_steady.lua: only responses after the
warm-up, when every connection is open).

The volume description points at a device that does not exist, so status reads
/proc/self/mountinfo and /sys/block/dm-*/dm/name and answers "unmounted": the same work as a
poll of a real volume. Runs as root. Results: stdout (a Markdown table) and
vm-out/bench_status.json (VM) or vm-out/bench_status_host.json (host).

usage: bench_status.py [CONFIG...]   (default: BENCH_CONFIGS, else every configuration available)
knobs: BENCH_SECONDS (20), BENCH_WARMUP (10), BENCH_LEVELS ("1 8 32 64"), BENCH_OLD_TREE
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import socket
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
WARMUP = int(os.environ.get("BENCH_WARMUP", "10"))
LEVELS = tuple(int(n) for n in os.environ.get("BENCH_LEVELS", "1 8 32 64").split())
OLD_TREE = Path(os.environ["BENCH_OLD_TREE"]) if os.environ.get("BENCH_OLD_TREE") else None
PORT = 15000
STATUS = "/luksctl_api/v1.0/status"
IN_VM = "LUKSCTL_VM_OUT" in os.environ
# On the host, next to the VM's results (as bench_fanout.py), but under a name of its own.
OUT = Path(os.environ["LUKSCTL_VM_OUT"] if IN_VM else os.environ.get("VM_OUT", REPO / "vm-out"))
RESULT = OUT / ("bench_status.json" if IN_VM else "bench_status_host.json")
CONFIGS = ["proxy", "direct"] + (["direct-old-worker"] if OLD_TREE else [])


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
def serving(name: str, workdir: Path, config: dict | None = None) -> Iterator[str]:
    """Status served as `name` on 127.0.0.1:PORT over TLS; yields its URL."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(workdir)}
    stack = Serving(workdir, write_config(workdir, config or {}), env=env, ready_timeout=600)
    log = OUT / f"bench.{name}{'' if IN_VM else '.host'}.log"
    try:
        if name == "proxy":
            sockets = workdir / "sockets"
            sockets.mkdir(exist_ok=True)
            socket_path = sockets / "gunicorn.sock"
            stack.start_gunicorn(gunicorn_argv(workdir, f"unix:{socket_path}", tls=False), socket_path, log)
            stack.start_nginx("nginx", socket_path, PORT, cert=workdir / "cert.pem", key=workdir / "key.pem", user="root", log=log)
        elif name == "direct":
            stack.start(gunicorn_argv(workdir, f"127.0.0.1:{PORT}", tls=True), log)
        elif name == "direct-old-worker":
            stack.start(gunicorn_argv(workdir, f"127.0.0.1:{PORT}", tls=True, tree=OLD_TREE), log,
                        env={**stack.env, "PYTHONPATH": str(OLD_TREE / "src")})
        else:
            raise SystemExit(f"no configuration {name!r}: {CONFIGS}")
        url = f"https://127.0.0.1:{PORT}{STATUS}"
        wait_answering(url, stack.processes)
        yield url
    finally:
        stack.stop()
        wait_port_free()


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


def wait_port_free() -> None:
    for _ in range(120):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", PORT)) != 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {PORT} still taken")


def measure(name: str, workdir: Path) -> dict:
    results = {}
    with serving(name, workdir) as url:
        for level in LEVELS:
            out = subprocess.run(["wrk", f"-t{min(level, 2)}", f"-c{level}", f"-d{WARMUP + SECONDS}s", "--timeout", "60s",
                                  "--latency", "-s", str(REPO / "scripts" / "wrk_steady.lua"), url,
                                  "--", str(WARMUP)], capture_output=True, text=True, check=True).stdout
            figures = wrk_output.parse(out)
            results[level] = {k: figures.get(k, 0.0) for k in ("rps", "steady_rps", "p50_ms", "p99_ms", "failed_requests")}
            print(f"{name:22} c={level:2}: {results[level]}", flush=True)
    return results


def main(names: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    where = "VM (software emulation)" if IN_VM else f"host ({os.cpu_count()} CPUs, {platform.release()})"
    results: dict = {"where": where, "seconds_per_window": SECONDS, "warmup_seconds": WARMUP, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        workdir = Path(tmp)
        subprocess.run([installed("luksctl-api"), "gen-cert", "--owner", "root",
                        "--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem")],
                       check=True, capture_output=True)
        workdir.chmod(0o755)
        for name in names or CONFIGS:
            results["configs"][name] = measure(name, workdir)
    RESULT.write_text(json.dumps(results, indent=2))
    print(f"\n{where}, {SECONDS} s after {WARMUP} s of warm-up; steady req/s, wrk's req/s (p50 / p99 ms)\n")
    print("| configuration | " + " | ".join(f"{n} clients" for n in LEVELS) + " |")
    print("|---|" + "---|" * len(LEVELS))
    for name, by_level in results["configs"].items():
        cells = [f"{r['steady_rps']:.1f}, {r['rps']:.1f} ({r['p50_ms']:.0f} / {r['p99_ms']:.0f})" + (f", {r['failed_requests']} failed" if r["failed_requests"] else "")
                 if (r := by_level.get(level)) else "" for level in LEVELS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or os.environ.get("BENCH_CONFIGS", "").split()))
