"""Cluster fan-outs (issue 10, item 5): any caller can ask for one, so concurrent requests share
one, a recent result is answered again, and every answer that carries `nodes` is audited."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from frontend_fakes import OPEN, answer, payload

from luksctl.api import cluster, create_frontend_app
from luksctl.config import FrontendConfig

NODES = "/luksctl_api/v1.0/nodes"
WORKERS = ["10.0.0.2", "10.0.0.3"]


class CountingWorkers:
    """Stands in for cluster.remount_workers / worker_states: counts calls, each takes `delay`."""

    def __init__(self):
        self.calls: dict[str, int] = {"nfs-mount": 0, "status": 0}
        self.delay = 0.3
        self._lock = threading.Lock()

    def fake(self, kind: str):
        def call(client, hosts):
            with self._lock:
                self.calls[kind] += 1
            time.sleep(self.delay)
            return {host: "mounted" for host in hosts}

        return call


@pytest.fixture
def workers(monkeypatch) -> CountingWorkers:
    fake = CountingWorkers()
    monkeypatch.setattr(cluster, "remount_workers", fake.fake("nfs-mount"))
    monkeypatch.setattr(cluster, "worker_states", fake.fake("status"))
    return fake


@pytest.fixture
def interval() -> float:
    return 60


@pytest.fixture
def app(tmp_path, ini, bridge, fake_vault, workers, interval):
    """Overrides conftest's app: cluster mode (audit_lines then captures this one)."""
    config = FrontendConfig(
        INFRASTRUCTURE_CONFIGURATION="cluster",
        WN_IPS=WORKERS,
        CLUSTER_TOKEN_FILE=str(tmp_path / "no-token"),
        CRYPTDEV_INI=str(ini),
        LOCK_FILE=str(tmp_path / "open.lock"),
        ALLOW_ANY_VAULT_URL=True,
        FANOUT_MIN_INTERVAL=interval,
        FAILED_OPEN_LIMIT=0,  # 8 opens in flight from one address would count against it
    )
    return create_frontend_app(config, bridge=bridge)


def at_once(app, count: int, request) -> list:
    start = threading.Barrier(count)

    def one(_):
        start.wait()
        return request(app.test_client())

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_opens_on_a_mounted_volume_share_one_fan_out(app, kernel, workers, audit_lines):
    kernel.mounted = True

    responses = at_once(app, 8, lambda client: client.post(OPEN, json=payload()))

    assert workers.calls["nfs-mount"] == 1
    assert all(answer(r, 200)["nodes"] == {host: "mounted" for host in WORKERS} for r in responses)
    lines = audit_lines()
    assert len(lines) == 8 and all(line["nodes"] == {host: "mounted" for host in WORKERS} for line in lines)
    assert sorted(line["fanout"] for line in lines) == ["new"] + ["shared"] * 7


def test_a_recent_fan_out_is_answered_again_without_calling_the_workers(app, kernel, workers):
    kernel.mounted = True
    client = app.test_client()

    for _ in range(3):
        answer(client.post(OPEN, json=payload()), 200)

    assert workers.calls["nfs-mount"] == 1


@pytest.mark.parametrize("interval", [0.5])
def test_after_the_interval_the_workers_are_called_again(app, kernel, workers, interval):
    kernel.mounted = True
    client = app.test_client()

    answer(client.post(OPEN, json=payload()), 200)
    time.sleep(interval + 0.1)
    answer(client.post(OPEN, json=payload()), 200)

    assert workers.calls["nfs-mount"] == 2


def test_an_open_that_mounts_calls_the_workers_even_within_the_interval(app, kernel, workers, fake_vault):
    """Remounts made before this mount saw no export: their result cannot stand for it."""
    kernel.mounted = True
    client = app.test_client()
    answer(client.post(OPEN, json=payload()), 200)
    kernel.mounted = False  # the operator closed the volume

    answer(client.post(OPEN, json=payload()), 200)

    assert workers.calls["nfs-mount"] == 2
    assert len(fake_vault.calls) == 1


def test_concurrent_node_polls_share_one_fan_out_and_each_is_audited(app, workers, audit_lines):
    responses = at_once(app, 8, lambda client: client.get(NODES))

    assert workers.calls["status"] == 1
    assert all(answer(r, 200)["nodes"] == {host: "mounted" for host in WORKERS} for r in responses)
    lines = audit_lines()
    assert [line["action"] for line in lines] == ["nodes"] * 8
    assert all(line["nodes"] == {host: "mounted" for host in WORKERS} and line["status"] == 200 for line in lines)
