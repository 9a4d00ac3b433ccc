"""/metrics under a real gunicorn with the shipped config and two worker processes: every scrape,
whichever worker answers it, counts the requests of both (prometheus_client's multiprocess mode,
PROMETHEUS_MULTIPROC_DIR as the units set it), and deploy/gunicorn.conf.py's hooks empty the
directory at start and keep a dead worker's counts. The directory is not made beforehand: systemd
makes only the unit's RuntimeDirectory= above it."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.net import free_port
from support.waiting import wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BAD_OPENS = 24


def bad_open_count(base: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10, headers={"Connection": "close"}).text
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "luksctl_api_opens_total" and sample.labels == {"outcome": "denied", "error_class": "BadRequest"}]
    return samples[0].value if samples else 0.0


def workers_of(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


@pytest.fixture
def served(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ALLOW_PLAIN_HTTP": True, "LOCK_FILE": str(tmp_path / "open.lock"), "FAILED_OPEN_LIMIT": 0,
                                  "CRYPTDEV_INI": str(tmp_path / "luks-cryptdev.ini")}))
    multiproc = tmp_path / "metrics"  # not made yet: systemd makes only the RuntimeDirectory= above it
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py"), "--workers", "2",
         "--bind", f"127.0.0.1:{port}", "luksctl.api:create_frontend_app()"],
        env={**os.environ, "LUKSCTL_API_CONFIG": str(config), "PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert server.poll() is None, "gunicorn exited"
        try:
            return len(workers_of(server.pid)) == 2 and requests.get(f"{base}/metrics", timeout=2).ok
        except requests.RequestException:  # refused, or a worker still importing on a loaded host
            return False

    try:
        wait_until(answers, 60, "gunicorn with two workers", interval=0.1)
        yield base, server.pid, multiproc
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_scrape_counts_the_requests_of_both_workers_and_of_one_that_died(served):
    base, master, multiproc = served

    pids = workers_of(master)

    def counted_by() -> set[int]:
        return {int(path.stem.rsplit("_", 1)[1]) for path in multiproc.glob("counter_*.db")}

    sent = 0
    # A new connection each: the kernel hands them to whichever worker accepts first, so go on
    # until both have answered some (and at least BAD_OPENS in all).
    while sent < BAD_OPENS or (counted_by() != pids and sent < 50 * BAD_OPENS):
        response = requests.post(f"{base}/luksctl_api/v1.0/open", data=b"not json", timeout=10,
                                 headers={"Content-Type": "application/json", "Connection": "close"})
        assert response.status_code == 400
        sent += 1

    assert counted_by() == pids, "both workers answered some of the opens"
    assert [bad_open_count(base) for _ in range(6)] == [sent] * 6

    os.kill(min(pids), signal.SIGKILL)  # gunicorn replaces it; its counts stay in the sum
    wait_until(lambda: len(workers_of(master)) == 2 and min(pids) not in workers_of(master), 60, "a new worker", interval=0.1)
    assert [bad_open_count(base) for _ in range(6)] == [sent] * 6


@pytest.fixture
def previous_run(tmp_path, monkeypatch) -> Path:
    """A multiprocess directory with the files of a run whose workers were 4242 and 4343."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for name in ("gauge_livemax_4242.db", "counter_4242.db", "gauge_livemax_4343.db"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_child_exit_marks_the_worker_dead_for_prometheus_client(previous_run):
    runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))["child_exit"](None, type("Worker", (), {"pid": 4242})())

    assert sorted(path.name for path in previous_run.iterdir()) == ["counter_4242.db", "gauge_livemax_4343.db"]


def test_when_ready_empties_the_directory_of_a_previous_run(previous_run):
    runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))["when_ready"](None)

    assert list(previous_run.iterdir()) == []
