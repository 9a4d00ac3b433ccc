"""`make bench`: the figures behind BENCHMARKS.md, measured on the real stack in the VM.

Runs inside the VM as root (scripts/vm-run.sh bench). Software emulation
makes every absolute time slow, so each comparison is made within this one
run and reported as a ratio too. Results: stdout (Markdown) and vm-out/bench.json.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))

from helpers_vm import OUT, SERVICE_PATH, Api, Bao, Dashboard, run, single_vm_config, single_vm_stack, wait_until  # noqa: E402

import wrk_output  # noqa: E402  (scripts/, this script's own directory)
from luksctl import vault  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
LEGACY_SECONDS = int(os.environ.get("BENCH_LEGACY_SECONDS", "60"))
# Which parts run: "open" (the breakdown, on a test-KDF and an argon2id volume), "status" (wrk).
PARTS = os.environ.get("BENCH_PARTS", "open,status").split(",")
LEVELS = (1, 8, 32, 64)
LEGACY_PORT = 5001
PASSPHRASE = "bench passphrase"

# The old design: every status poll spawned sudo + the luksctl interpreter.
LEGACY_APP = '''
import json, subprocess
from flask import Flask
app = Flask(__name__)

@app.get("/luksctl_api/v1.0/status")
def status():
    done = subprocess.run(["/usr/bin/sudo", "-n", "/usr/local/sbin/luksctl", "--json", "status"], capture_output=True)
    return {"volume_state": json.loads(done.stdout)["volume_state"]}
'''

def wrk(url: str, connections: int, seconds: int) -> dict:
    """Requests/s and latency percentiles from wrk (C, so the client costs little CPU)."""
    out = run("wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "120s", "--latency", url).stdout.decode()
    figures = wrk_output.parse(out)
    return {"rps": figures["rps"], "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
            "errors": figures["failed_requests"]}


def start_legacy_server(api: Api) -> subprocess.Popen:
    """The old status design behind the same gunicorn command line, user and TLS."""
    module_dir = Path("/tmp/bench")
    module_dir.mkdir(exist_ok=True)
    (module_dir / "legacy_status.py").write_text(LEGACY_APP)
    module_dir.chmod(0o755)
    argv = [arg.replace("0.0.0.0:5000", f"127.0.0.1:{LEGACY_PORT}") for arg in api.unit.exec_start[:-1]]
    user = pwd.getpwnam(api.unit.one("User"))
    command = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--",
               *argv, "--pythonpath", str(module_dir), "legacy_status:app"]
    log = (OUT / "legacy.log").open("wb")
    proc = subprocess.Popen(command, env={"PATH": SERVICE_PATH, "HOME": "/tmp"}, stdout=log, stderr=log, cwd="/")
    wait_until(lambda: run("curl", "-sk", f"https://127.0.0.1:{LEGACY_PORT}/luksctl_api/v1.0/status", check=False).returncode == 0,
               120, "legacy status server")
    return proc


def status_benchmark(api: Api) -> dict:
    legacy = start_legacy_server(api)
    try:
        results: dict = {"ours": {}, "legacy": {}}
        for level in LEVELS:
            # One legacy poll takes seconds under emulation: give it a window that completes several.
            for name, port, seconds, repeats in (("ours", 5000, SECONDS, RUNS), ("legacy", LEGACY_PORT, max(SECONDS, LEGACY_SECONDS), 1)):
                runs = [wrk(f"https://127.0.0.1:{port}/luksctl_api/v1.0/status", level, seconds) for _ in range(repeats)]
                results[name][level] = {key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_ms", "p99_ms", "errors")}
                print(f"status {name:6} c={level:2}: {results[name][level]}", flush=True)
        return results
    finally:
        legacy.terminate()
        legacy.wait(60)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def open_breakdown(api: Api, bao: Bao, volume, secret_path: str) -> dict:
    """Each part of an open timed on its own, then the whole open through the API."""
    dashboard = Dashboard(api.base_url)
    ref = vault.SecretRef("secrets", secret_path, "storage_encryption_key")
    user = pwd.getpwnam(api.unit.one("User"))
    as_service_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
    parts: dict[str, list[float]] = {k: [] for k in ("vault", "sudo_cli_start", "cryptsetup_open", "mount", "api_open_total")}
    for _ in range(RUNS + 2):
        token = bao.wrap_token()
        parts["vault"].append(timed(lambda: vault.fetch_passphrase(bao.url, ref, token, vault.VaultSettings(allow_http=True))))
        parts["sudo_cli_start"].append(timed(lambda: run(*as_service_user, "/usr/bin/sudo", "-n", "/usr/local/sbin/luksctl", "--json", "status", check=False)))
        parts["cryptsetup_open"].append(timed(lambda: run("cryptsetup", "open", "--key-file=-", str(volume.by_uuid), volume.cryptdev, input=volume.passphrase)))
        parts["mount"].append(timed(lambda: run("mount", "-t", "ext4", volume.mapper, "/srv/export")))
        run("umount", "/srv/export")
        run("cryptsetup", "close", volume.cryptdev)
        payload = bao.open_payload(secret_path)
        parts["api_open_total"].append(timed(lambda: dashboard.open(payload)))
        run("/usr/local/sbin/luksctl", "close")
    medians = {key: statistics.median(values) for key, values in parts.items()}
    medians["overhead_beyond_cryptsetup"] = medians["api_open_total"] - medians["cryptsetup_open"]
    # Issue 11's goal: the whole open at most 1.25 x what cryptsetup and mount cost on their own.
    medians["ratio_to_cryptsetup_and_mount"] = medians["api_open_total"] / (medians["cryptsetup_open"] + medians["mount"])
    medians["pbkdf"] = pbkdf_of(volume)
    print(f"open breakdown (median ms over {RUNS + 2}): {medians}", flush=True)
    return medians


def pbkdf_of(volume) -> str:
    dump = run("cryptsetup", "luksDump", volume.loop).stdout.decode()
    found = re.search(r"PBKDF:\s+(\S+)", dump)
    costs = [f"{match.group(2)} {match.group(1).lower()}" for match in re.finditer(r"(Iterations|Time cost|Memory|Threads):\s+(\d+)", dump)]
    return ", ".join([found.group(1) if found else "?", *costs])


def main() -> int:
    with single_vm_stack() as (volumes, bao, api):
        volume = volumes(PASSPHRASE)
        bao.start()
        secret_path = bao.store_passphrase("bench", "deployment", PASSPHRASE)
        api.start(single_vm_config(bao, FAILED_OPEN_LIMIT=0))
        results: dict = {"runs": RUNS, "seconds_per_run": SECONDS, "parts": PARTS}
        if "open" in PARTS:
            results["open"] = {"test_kdf": open_breakdown(api, bao, volume, secret_path)}
            # Then cryptsetup's default PBKDF (argon2id), as production volumes have; the newest volume is the current one.
            results["open"]["default_kdf"] = open_breakdown(api, bao, volumes(PASSPHRASE, test_kdf=False), secret_path)
        if "status" in PARTS:
            Dashboard(api.base_url).open(bao.open_payload(secret_path))  # status benchmarks poll a mounted volume
            results["status"] = status_benchmark(api)
            results["status_ratio_rps"] = {
                level: results["status"]["ours"][level]["rps"] / max(results["status"]["legacy"][level]["rps"], 1e-9) for level in LEVELS
            }
        (OUT / "bench.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return 0


if __name__ == "__main__":
    sys.exit(main())
