"""GET /metrics on both services through Flask's test client, with the fake bridge and a faked Vault
step: promtool accepts the body, the counters move by exactly what happened, and no label or value
carries the token, the passphrase, the Vault path or the caller."""

from __future__ import annotations

import subprocess
import time

import pytest
from frontend_fakes import OPEN, PASSPHRASE, TOKEN, answer, make_client, payload
from prometheus_client.parser import text_string_to_metric_families
from support.bridge import FakeBridge

from luksctl.api import cluster, create_worker_app, metrics, worker
from luksctl.config import WorkerConfig
from luksctl.errors import VaultUnreachable, WrappingTokenInvalid, WrongPassphrase

METRICS = "/metrics"
CALLER = "192.0.2.77"


def scrape(client, **kwargs) -> str:
    response = client.get(METRICS, **kwargs)
    assert response.status_code == 200, response.text
    assert response.mimetype == "text/plain" and "version=" in response.content_type
    return response.text


def value(text: str, name: str, **labels: str) -> float:
    """The sample's value; 0 when it has not been counted yet."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def moved(before: str, after: str, name: str, **labels: str) -> float:
    """How much the sample went up between two scrapes."""
    return value(after, name, **labels) - value(before, name, **labels)


def promtool_check(text: str) -> None:
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked.stdout + checked.stderr


def test_metrics_is_the_text_exposition_promtool_accepts(client, kernel):
    kernel.mounted = True
    client.post(OPEN, json=payload())

    text = scrape(client)

    promtool_check(text)
    assert value(text, "luksctl_api_volume_state", state="mounted") == 1
    assert value(text, "luksctl_api_volume_state", state="unmounted") == 0


def test_a_wrong_passphrase_moves_its_counter_and_each_stage_by_exactly_one(client, bridge, fake_vault):
    before = scrape(client)
    bridge.error = WrongPassphrase("no key available with this passphrase")

    answer(client.post(OPEN, json=payload()), 422)

    after = scrape(client)
    assert moved(before, after, "luksctl_api_opens_total", outcome="denied", error_class="WrongPassphrase") == 1
    assert moved(before, after, "luksctl_api_opens_total", outcome="ok", error_class="none") == 0
    for stage in ("vault", "privileged"):
        assert moved(before, after, "luksctl_api_open_stage_duration_seconds_count", stage=stage) == 1
    assert moved(before, after, "luksctl_api_last_open_success_timestamp_seconds") == 0


def test_an_open_counts_ok_and_sets_the_last_open_time(client, kernel):
    before = scrape(client)

    answer(client.post(OPEN, json=payload()), 200)

    after = scrape(client)
    assert moved(before, after, "luksctl_api_opens_total", outcome="ok", error_class="none") == 1
    assert time.time() - 5 < value(after, "luksctl_api_last_open_success_timestamp_seconds") <= time.time()
    assert value(after, "luksctl_api_volume_state", state="mounted") == 1


def test_vault_down_is_an_error_of_its_class_without_a_privileged_stage(client, fake_vault):
    before = scrape(client)
    fake_vault.error = VaultUnreachable("Vault at https://vault.example:8200 cannot be reached")

    answer(client.post(OPEN, json=payload()), 502)

    after = scrape(client)
    assert moved(before, after, "luksctl_api_opens_total", outcome="error", error_class="VaultUnreachable") == 1
    assert moved(before, after, "luksctl_api_open_stage_duration_seconds_count", stage="privileged") == 0


def test_rate_limit_refusals_are_counted(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, FAILED_OPEN_LIMIT=1, FAILED_OPEN_WINDOW=60)
    fake_vault.error = WrappingTokenInvalid("the wrapping token is invalid, expired or already used")
    before = scrape(client)

    statuses = [client.post(OPEN, json=payload()).status_code for _ in range(3)]

    after = scrape(client)
    assert statuses == [403, 429, 429]
    assert moved(before, after, "luksctl_api_rate_limited_total") == 2
    assert moved(before, after, "luksctl_api_opens_total", outcome="denied", error_class="TooManyFailures") == 2


def test_a_caller_outside_allowed_clients_gets_json_403_with_the_volume_state(tmp_path, ini, bridge, fake_vault):
    client = make_client(tmp_path, ini, bridge, ALLOWED_CLIENTS=["10.0.0.0/24"])

    body = answer(client.get(METRICS, environ_base={"REMOTE_ADDR": "192.0.2.9"}), 403)

    assert "ALLOWED_CLIENTS" in body["error"]
    assert "luksctl_api_volume_state" in scrape(client, environ_base={"REMOTE_ADDR": "10.0.0.7"})


def test_no_label_or_value_carries_the_token_the_passphrase_the_vault_path_or_the_caller(client, bridge, fake_vault, kernel):
    body = payload(secret_root="planted-root", secret_path="planted/vault/path", secret_key="planted_key")
    fake_vault.error = WrappingTokenInvalid("the wrapping token is invalid, expired or already used")
    client.post(OPEN, json=body, environ_base={"REMOTE_ADDR": CALLER})
    fake_vault.error = None
    bridge.error = WrongPassphrase("no key available with this passphrase")
    client.post(OPEN, json=body, environ_base={"REMOTE_ADDR": CALLER})
    bridge.error = None
    client.post(OPEN, json=body, environ_base={"REMOTE_ADDR": CALLER})

    text = scrape(client, environ_base={"REMOTE_ADDR": CALLER})

    assert value(text, "luksctl_api_volume_state", state="mounted") == 1
    for planted in (TOKEN, PASSPHRASE, "planted", "vault.example", CALLER, "xkqzbmwe", "/export"):
        assert planted not in text, planted


def test_every_fan_out_answer_is_counted_per_worker_address_and_call(monkeypatch):
    monkeypatch.setattr(cluster.WorkerClient, "call", lambda self, host, method, endpoint: {"10.99.0.2": "mounted"}.get(host, "unreachable"))
    workers = cluster.WorkerClient(scheme="https", port=5000, verify=True, connect_timeout=1, read_timeout=1, token="t0ken")
    before = metrics.generate_latest(metrics.COUNTED).decode()

    cluster.remount_workers(workers, ["10.99.0.2", "10.99.0.3"])

    after = metrics.generate_latest(metrics.COUNTED).decode()
    for worker_ip, outcome in (("10.99.0.2", "mounted"), ("10.99.0.3", "unreachable")):
        labels = {"call": "nfs-mount", "worker": worker_ip, "outcome": outcome}
        assert moved(before, after, "luksctl_api_fanout_outcomes_total", **labels) == 1
    assert "t0ken" not in after


@pytest.fixture
def worker_client(tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "nfs_mount_states", lambda mountpoints, **kwargs: {mountpoint: True for mountpoint in mountpoints})
    config = WorkerConfig(NFS_MOUNTPOINT_LIST=["/home"], ALLOW_UNAUTHENTICATED_NFS_MOUNT=True, ALLOWED_CLIENTS=["10.0.0.0/24"])
    return create_worker_app(config, FakeBridge(nfs_mount_action=lambda: {"nfs_state": "mounted"}), runtime_dir=tmp_path).test_client()


def test_the_worker_serves_its_nfs_state_and_refuses_other_callers_in_json(worker_client):
    text = scrape(worker_client, environ_base={"REMOTE_ADDR": "10.0.0.7"})

    promtool_check(text)
    assert value(text, "luksctl_api_nfs_state", state="mounted") == 1 and value(text, "luksctl_api_nfs_state", state="unavailable") == 0
    refused = worker_client.get(METRICS, environ_base={"REMOTE_ADDR": "192.0.2.9"})
    assert refused.status_code == 403 and refused.json["nfs_state"] == "mounted" and "ALLOWED_CLIENTS" in refused.json["error"]


def test_metrics_false_serves_no_metrics_and_opens_still_answer(tmp_path, ini, bridge, fake_vault, kernel):
    client = make_client(tmp_path, ini, bridge, METRICS=False)

    assert answer(client.get(METRICS), 404)["volume_state"] == "unmounted"
    assert answer(client.post(OPEN, json=payload()), 200)["volume_state"] == "mounted"


def test_metrics_false_on_a_worker_serves_no_metrics(tmp_path):
    config = WorkerConfig(NFS_MOUNTPOINT_LIST=["/home"], METRICS=False)
    client = create_worker_app(config, FakeBridge(), runtime_dir=tmp_path).test_client()

    refused = client.get(METRICS)
    assert refused.status_code == 404 and "nfs_state" in refused.json
