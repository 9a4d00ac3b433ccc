"""Monitoring on a real kernel: Debian's Prometheus scrapes the front-end API's /metrics over TLS
(gunicorn as luksctl_api, from the unit, with PROMETHEUS_MULTIPROC_DIR) and a worker API's (the
cluster lab's first worker host, luksctl-api-wn as its unit runs it, behind its proxy), and
Debian's node exporter reads the file `luksctl report --prometheus` writes. After the dashboard's open a query
through Prometheus's HTTP API says mounted; after a wrong passphrase the failure counter of its
error class has gone up by exactly one; the worker's NFS state is the one its /status gives; no
scraped text holds the passphrase, a token or the
secret's path. Prometheus also loads deploy/prometheus/luksctl-rules.yml.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from cluster_lab import WORKER_PORT
from helpers_vm import LUKS_DIR, OUT, REPO, clear_failed_opens, stop_process, tail, wait_until

PROMETHEUS = "/usr/bin/prometheus"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
LUKSCTL = "/usr/local/sbin/luksctl"
PROMETHEUS_URL = "http://127.0.0.1:9090"
NODE_EXPORTER_URL = "http://127.0.0.1:9100"
API_CERT = LUKS_DIR / "gunicorn-cert.pem"  # self-signed, with 127.0.0.1 among its names (gen-cert)
SCRAPE_WAIT = 180  # several scrapes (every 10 s)
SUB = "metrics-user-sub"

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 10s  # a scrape may take as long (its timeout): TLS and Python under software emulation
  evaluation_interval: 10s
rule_files:
  - {rules}
scrape_configs:
  - job_name: luksctl-api
    scheme: https
    tls_config:
      ca_file: {api_cert}
    static_configs:
      - targets: ["127.0.0.1:5000"]
  - job_name: luksctl-api-wn
    scheme: https
    tls_config:
      ca_file: {worker_cert}  # the worker's own, from gen-cert in its node: its address among its names
    static_configs:
      - targets: ["{worker}"]
  - job_name: node
    static_configs:
      - targets: ["127.0.0.1:9100"]
"""


def started(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def answers(proc: subprocess.Popen, url: str, log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:\n{tail(log)}")
    try:
        return requests.get(url, timeout=5).ok
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def monitoring(worker_lab):
    """Node exporter on the textfile directory, and Prometheus scraping it, the API and the lab's
    first worker; the directory and that worker."""
    OUT.mkdir(parents=True, exist_ok=True)
    worker_lab.restart_stale_workers()
    worker = worker_lab.workers[0]
    work = Path(tempfile.mkdtemp(prefix="luksctl-metrics-"))
    textfile_dir = work / "textfile"
    textfile_dir.mkdir()
    (work / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(
        rules=REPO / "deploy" / "prometheus" / "luksctl-rules.yml", api_cert=API_CERT, worker_cert=worker.cert,
        worker=f"{worker.ip}:{WORKER_PORT}"))
    node_log, prometheus_log = OUT / "node-exporter.log", OUT / "prometheus.log"
    node = started([NODE_EXPORTER, "--web.listen-address=127.0.0.1:9100", "--collector.disable-defaults",
                    "--collector.textfile", f"--collector.textfile.directory={textfile_dir}", "--collector.stat"], node_log)
    prometheus = started([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                          "--web.listen-address=127.0.0.1:9090"], prometheus_log)
    try:
        wait_until(lambda: answers(node, f"{NODE_EXPORTER_URL}/metrics", node_log), SCRAPE_WAIT, "the node exporter")
        wait_until(lambda: answers(prometheus, f"{PROMETHEUS_URL}/-/ready", prometheus_log), SCRAPE_WAIT, "Prometheus")
        yield textfile_dir, worker
    finally:
        stop_process(prometheus, 60)
        stop_process(node, 60)


def query(expr: str) -> list[dict]:
    body = requests.get(f"{PROMETHEUS_URL}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(expr: str) -> float | None:
    found = query(expr)
    assert len(found) <= 1, found
    return float(found[0]["value"][1]) if found else None


def scraped_after(moment: float) -> bool:
    """Every target is up and was scraped after `moment` (Unix time)."""
    return {target["labels"]["job"] for target in requests.get(f"{PROMETHEUS_URL}/api/v1/targets", timeout=30).json()["data"]["activeTargets"]
            if target["health"] == "up" and _seconds(target["lastScrape"]) > moment} == {"luksctl-api", "luksctl-api-wn", "node"}


def _seconds(rfc3339: str) -> float:
    """Go's RFC 3339 with nanoseconds, as Unix time (fromisoformat takes microseconds at most)."""
    stamp, fraction, zone = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", rfc3339).groups()
    return datetime.fromisoformat(stamp + (fraction or "")[:7] + ("+00:00" if zone == "Z" else zone)).timestamp()


def write_report(textfile_dir: Path) -> None:
    done = subprocess.run([LUKSCTL, "report", "--prometheus", "--textfile-dir", str(textfile_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_sees_the_open_the_wrong_passphrase_the_root_facts_and_the_worker_and_no_secret(
        monitoring, worker_lab, bao_up, luks_volume, dashboard):
    textfile_dir, worker = monitoring
    clear_failed_opens()
    volume = luks_volume("metrics volume passphrase " + secrets.token_hex(8))
    right_path = bao_up.store_passphrase(SUB, volume.uuid, volume.passphrase.decode())
    wrong = "not the metrics passphrase " + secrets.token_hex(8)
    wrong_path = bao_up.store_passphrase(SUB, volume.uuid + "-wrong", wrong)
    unwrapped = "metricstok" + secrets.token_hex(12)
    wrong_token, right_token = bao_up.wrap_token(token_id=unwrapped), bao_up.wrap_token()
    failures = 'luksctl_api_opens_total{job="luksctl-api", outcome="denied", error_class="WrongPassphrase"}'
    write_report(textfile_dir)
    moment = time.time()
    wait_until(lambda: scraped_after(moment), SCRAPE_WAIT, "a scrape of both APIs over TLS and of the node exporter")
    before = value(failures) or 0.0
    assert value('luksctl_keyslots_in_use{job="node"}') == 1
    nfs_state = worker.status().json()["nfs_state"]
    assert value(f'luksctl_api_nfs_state{{job="luksctl-api-wn", instance="{worker.ip}:{WORKER_PORT}", state="{nfs_state}"}}') == 1
    assert value('sum(luksctl_api_nfs_state{job="luksctl-api-wn"})') == 1, "one state at a time"

    assert dashboard.open(bao_up.open_payload(wrong_path, wrong_token)).response.status_code == 422
    wait_until(lambda: value(failures) == before + 1, SCRAPE_WAIT, "the wrong passphrase counted")
    moment = time.time()
    wait_until(lambda: scraped_after(moment), SCRAPE_WAIT, "another scrape")
    assert value(failures) == before + 1, "counted exactly once, whichever gunicorn worker answers the scrape"

    reply = dashboard.open(bao_up.open_payload(right_path, right_token))
    assert reply.state == "mounted", reply.response.text
    wait_until(lambda: value('luksctl_api_volume_state{job="luksctl-api", state="mounted"}') == 1, SCRAPE_WAIT, "the API's mounted state")
    write_report(textfile_dir)
    wait_until(lambda: value('luksctl_volume_state{job="node", state="mounted"}') == 1, SCRAPE_WAIT, "the textfile's mounted state")
    assert value('luksctl_api_last_open_success_timestamp_seconds{job="luksctl-api"}') > moment - 60
    rules = requests.get(f"{PROMETHEUS_URL}/api/v1/rules", timeout=30).json()["data"]["groups"]
    assert "LuksctlVolumeNotMounted" in [rule["name"] for group in rules for rule in group["rules"]], "Prometheus loaded the shipped rules"

    scraped = requests.get("https://127.0.0.1:5000/metrics", verify=str(API_CERT), timeout=60).text
    scraped += requests.get(f"https://{worker.ip}:{WORKER_PORT}/metrics", verify=str(worker.cert), timeout=60).text
    scraped += requests.get(f"{NODE_EXPORTER_URL}/metrics", timeout=60).text
    for name, needle in {"passphrase": volume.passphrase.decode(), "wrong passphrase": wrong, "wrapping token": wrong_token,
                         "other wrapping token": right_token, "unwrapped token": unwrapped, "secret path": wrong_path,
                         "right secret path": right_path, "user": SUB, "cluster token": worker_lab.token}.items():
        assert needle not in scraped, name
