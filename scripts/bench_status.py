"""Status throughput under concurrency, per serving configuration, natively or in the VM.

Issue 11 item 5: status throughput fell as clients were added, in the VM only. This starts
the front end with the unit's ExecStart (deploy/luksctl-api.service) and the repo's
deploy/gunicorn.conf.py, then varies one thing at a time: the worker class, TLS, the number
of workers, and whether wrk keeps connections alive. wrk (C, little CPU) runs 1, 8, 32 and
64 connections per configuration, each for BENCH_SECONDS after BENCH_WARMUP seconds.

Two rates per window: wrk's own (requests over the whole run, the connections' TLS
handshakes included, as earlier tables measured) and the steady rate (scripts/wrk_steady.lua:
only responses after the warm-up, when every connection is open). Under emulation a
handshake costs many requests' worth, so the two differ most there.

The volume description points at a device that does not exist, so status reads
/proc/self/mountinfo and /sys/block/dm-*/dm/name and answers "unmounted": the same work as a
poll of a real volume. Runs as root. Results: stdout (a Markdown table) and
vm-out/bench_status.json (VM) or vm-out/bench_status_host.json (host).

usage: bench_status.py [CONFIG...]   (default: BENCH_CONFIGS, else every configuration in CONFIGS)
knobs: BENCH_SECONDS (20), BENCH_WARMUP (10), BENCH_LEVELS ("1 8 32 64"), BENCH_CONFIGS (the
guest passes no arguments: make bench BENCH="BENCH_CONFIGS=deployed bench_status")
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import wrk_output  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "20"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "10"))
LEVELS = tuple(int(n) for n in os.environ.get("BENCH_LEVELS", "1 8 32 64").split())
PORT = 15000
STATUS = "/luksctl_api/v1.0/status"
IN_VM = "LUKSCTL_VM_OUT" in os.environ
# On the host, next to the VM's results (as bench_fanout.py), but under a name of its own.
OUT = Path(os.environ["LUKSCTL_VM_OUT"] if IN_VM else os.environ.get("VM_OUT", REPO / "vm-out"))
RESULT = OUT / ("bench_status.json" if IN_VM else "bench_status_host.json")

# name -> (extra gunicorn arguments, TLS, wrk arguments, client levels). Later gunicorn flags
# win. The one-change-each variants run at 8 and 32 clients only, to keep the VM run short.
ALL = None
PAIR = (8, 32)
CONFIGS = {
    "deployed": ([], True, [], ALL),
    "gthread": (["--worker-class", "gthread"], True, [], ALL),
    "deployed-new-conn": ([], True, ["-H", "Connection: close"], PAIR),
    "gthread-new-conn": (["--worker-class", "gthread"], True, ["-H", "Connection: close"], PAIR),
    "gthread-1-worker": (["--worker-class", "gthread", "--workers", "1"], True, [], PAIR),
    "gthread-plain-http": (["--worker-class", "gthread"], False, [], PAIR),
    "gthread-1-thread": (["--worker-class", "gthread", "--threads", "1"], True, [], PAIR),
}


def unit_argv() -> list[str]:
    for line in (REPO / "deploy" / "luksctl-api.service").read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise SystemExit("no ExecStart= in deploy/luksctl-api.service")


def serving_argv(workdir: Path, extra: list[str], tls: bool) -> list[str]:
    """The unit's command line with this machine's paths, on a loopback port."""
    argv = unit_argv()
    app = argv.pop()
    argv[0] = str(Path(sys.executable).with_name("gunicorn"))
    replaced = {"--config": str(REPO / "deploy" / "gunicorn.conf.py"), "--bind": f"127.0.0.1:{PORT}",
                "--certfile": str(workdir / "cert.pem"), "--keyfile": str(workdir / "key.pem")}
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in replaced:
            skip = True
            if tls or arg not in ("--certfile", "--keyfile"):
                out += [arg, replaced[arg]]
            continue
        out.append(arg)
    return out + extra + [app]


def write_config(workdir: Path, tls: bool) -> Path:
    ini = workdir / "luks-cryptdev.ini"
    ini.write_text("[luks]\nuuid = 0b2e6f5e-0000-4000-8000-00000000b0b0\ncryptdev = benchvol\n"
                   "mountpoint = /srv/bench-status\nfilesystem = ext4\n")
    config = workdir / "config.json"
    config.write_text(json.dumps({"CRYPTDEV_INI": str(ini), "LOCK_FILE": str(workdir / "open.lock"),
                                  "ALLOW_PLAIN_HTTP": not tls}))
    return config


def wait_answering(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """A loaded host can make the VM take minutes to import the app."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited {proc.returncode}")
        if subprocess.run(["curl", "-sk", "-m", "5", "-o", "/dev/null", url]).returncode == 0:
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
    extra, tls, wrk_args, levels = CONFIGS[name]
    config = write_config(workdir, tls)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(workdir),
           "LUKSCTL_API_CONFIG": str(config)}
    log = (OUT / f"bench_status.{name}{'' if IN_VM else '.host'}.log").open("wb")
    proc = subprocess.Popen(serving_argv(workdir, extra, tls), env=env, cwd="/", stdout=log, stderr=log)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{PORT}{STATUS}"
    results = {}
    try:
        wait_answering(url, proc)
        for level in levels or LEVELS:
            out = subprocess.run(["wrk", f"-t{min(level, 2)}", f"-c{level}", f"-d{WARMUP + SECONDS}s", "--timeout", "60s",
                                  "--latency", "-s", str(REPO / "scripts" / "wrk_steady.lua"), *wrk_args, url,
                                  "--", str(WARMUP)], capture_output=True, text=True, check=True).stdout
            figures = wrk_output.parse(out)
            results[level] = {k: figures.get(k, 0.0) for k in ("rps", "steady_rps", "p50_ms", "p99_ms", "failed_requests")}
            print(f"{name:22} c={level:2}: {results[level]}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        wait_port_free()
    return results


def main(names: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    where = "VM (software emulation)" if IN_VM else f"host ({os.cpu_count()} CPUs, {platform.release()})"
    results: dict = {"where": where, "seconds_per_window": SECONDS, "warmup_seconds": WARMUP, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        workdir = Path(tmp)
        subprocess.run([str(Path(sys.executable).with_name("luksctl-api")), "gen-cert", "--owner", "root",
                        "--cert", str(workdir / "cert.pem"), "--key", str(workdir / "key.pem")],
                       check=True, capture_output=True)
        for name in names or list(CONFIGS):
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
