"""The worker API through Flask's test client, with a fake bridge and scripted NFS mount states."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.bridge import FakeBridge

from luksctl.api import create_worker_app, worker
from luksctl.config import WorkerConfig
from luksctl.errors import ConfigError, PrivilegedCallFailed

STATUS = "/luksctl_api_wn/v1.0/status"
NFS_MOUNT = "/luksctl_api_wn/v1.0/nfs-mount"
MOUNTPOINTS = ["/home", "/export"]
CLUSTER_TOKEN = "c1uster-t0ken-shared-with-the-front-end"


def answer(response, status: int) -> dict:
    """Every worker answer is JSON with nfs_state; errors add a non-empty `error`."""
    body = json.loads(response.text)
    assert response.status_code == status, body
    assert response.mimetype == "application/json"
    assert isinstance(body, dict) and body.get("nfs_state") in ("mounted", "unmounted", "unavailable"), body
    if status >= 400:
        assert isinstance(body.get("error"), str) and body["error"].strip(), body
    assert CLUSTER_TOKEN not in response.text and "Traceback" not in response.text
    return body


class NfsMounts:
    """Scripted answer of luksctl.api.worker.nfs_mount_states."""

    def __init__(self):
        self.mounted: dict[str, bool] = {mountpoint: False for mountpoint in MOUNTPOINTS}
        self.asked: list[list[str]] = []
        self.mounts_after: list[str] = list(MOUNTPOINTS)  # what a remount mounts

    def nfs_mount_states(self, mountpoints, **kwargs):
        self.asked.append(list(mountpoints))
        return {mountpoint: self.mounted[mountpoint] for mountpoint in mountpoints}

    def remount(self) -> dict:
        """What `luksctl nfs-mount` does as root, as the bridge answers it."""
        for mountpoint in self.mounts_after:
            self.mounted[mountpoint] = True
        return {"nfs_state": "mounted" if all(self.mounted.values()) else "unmounted"}


@pytest.fixture
def nfs(monkeypatch) -> NfsMounts:
    fake = NfsMounts()
    monkeypatch.setattr(worker, "nfs_mount_states", fake.nfs_mount_states)
    return fake


@pytest.fixture
def bridge(nfs) -> FakeBridge:
    return FakeBridge(nfs_mount_action=nfs.remount)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "cluster-token"
    path.write_text(CLUSTER_TOKEN + "\n")
    path.chmod(0o640)  # as install.sh leaves it
    return path


@pytest.fixture
def client(tmp_path, token_file, bridge):
    config = WorkerConfig(NFS_MOUNTPOINT_LIST=MOUNTPOINTS, CLUSTER_TOKEN_FILE=str(token_file))
    return create_worker_app(config, bridge=bridge, runtime_dir=tmp_path).test_client()


def post_nfs_mount(client, token: str | None = CLUSTER_TOKEN):
    return client.post(NFS_MOUNT, headers={"X-Luksctl-Token": token} if token is not None else {})


def test_status_unmounted_when_any_mountpoint_is_missing(client, nfs):
    nfs.mounted["/home"] = True

    assert answer(client.get(STATUS), 200) == {"nfs_state": "unmounted"}
    assert nfs.asked == [MOUNTPOINTS]


def test_status_mounted_when_every_mountpoint_is_mounted(client, nfs):
    nfs.mounted = {mountpoint: True for mountpoint in MOUNTPOINTS}

    assert answer(client.get(STATUS), 200) == {"nfs_state": "mounted"}


def test_nfs_mount_when_already_mounted_does_not_call_the_bridge(client, nfs, bridge):
    nfs.mounted = {mountpoint: True for mountpoint in MOUNTPOINTS}

    body = answer(post_nfs_mount(client), 200)

    assert body == {"nfs_state": "mounted", "mountpoints": {"/home": True, "/export": True}}
    assert bridge.nfs_mounts == 0


def test_nfs_mount_calls_the_bridge_and_answers_the_new_state(client, nfs, bridge):
    nfs.mounted["/home"] = True

    body = answer(post_nfs_mount(client), 200)

    assert bridge.nfs_mounts == 1
    assert body == {"nfs_state": "mounted", "mountpoints": {"/home": True, "/export": True}}


def test_nfs_mount_still_incomplete_is_502_naming_what_is_missing(client, nfs, bridge):
    nfs.mounts_after = ["/home"]

    body = answer(post_nfs_mount(client), 502)

    assert bridge.nfs_mounts == 1
    assert body["nfs_state"] == "unmounted"
    assert "/export" in body["error"] and "/home" not in body["error"]


def test_bridge_failure_is_json_500_with_nfs_state(client, bridge):
    bridge.error = PrivilegedCallFailed("`sudo -n /usr/local/sbin/luksctl nfs-mount` failed (exit 1)")

    body = answer(post_nfs_mount(client), 500)

    assert body["nfs_state"] == "unmounted"


def test_unexpected_crash_is_json_500_without_details(client, bridge):
    bridge.error = RuntimeError("internal-detail")

    response = post_nfs_mount(client)

    answer(response, 500)
    assert "internal-detail" not in response.text


def test_concurrent_nfs_mounts_share_one_remount(client, nfs, bridge):
    """Any number of requests at once cost one `mount -a`; every one answers its outcome."""
    bridge.delay = 0.3
    start = threading.Barrier(8)
    sent, answered = [], []

    def request(_):
        start.wait()
        sent.append(time.monotonic())
        response = post_nfs_mount(client)
        answered.append(time.monotonic())
        return response

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(request, range(8)))

    assert max(sent) < min(answered), "the requests ran one after the other: nothing here was concurrent"
    assert bridge.nfs_mounts == 1
    assert [answer(response, 200)["nfs_state"] for response in responses] == ["mounted"] * 8


@pytest.mark.parametrize("token", [None, "", "wrong-token", CLUSTER_TOKEN + "x"])
def test_nfs_mount_needs_the_cluster_token(client, bridge, token):
    answer(post_nfs_mount(client, token), 403)

    assert bridge.nfs_mounts == 0


def test_nfs_mount_without_a_token_file_is_refused(tmp_path, bridge):
    config = WorkerConfig(NFS_MOUNTPOINT_LIST=MOUNTPOINTS, CLUSTER_TOKEN_FILE=str(tmp_path / "absent"))
    client = create_worker_app(config, bridge=bridge, runtime_dir=tmp_path).test_client()

    body = answer(post_nfs_mount(client), 403)

    assert str(tmp_path / "absent") in body["error"]
    assert bridge.nfs_mounts == 0


def test_a_token_file_readable_by_others_stops_the_worker_app(token_file, bridge):
    token_file.chmod(0o644)
    config = WorkerConfig(NFS_MOUNTPOINT_LIST=MOUNTPOINTS, CLUSTER_TOKEN_FILE=str(token_file))

    with pytest.raises(ConfigError, match="readable by others") as caught:
        create_worker_app(config, bridge=bridge)

    assert str(token_file) in caught.value.message


def test_unauthenticated_nfs_mount_can_be_allowed_for_old_front_ends(tmp_path, bridge):
    config = WorkerConfig(NFS_MOUNTPOINT_LIST=MOUNTPOINTS, CLUSTER_TOKEN_FILE=str(tmp_path / "absent"), ALLOW_UNAUTHENTICATED_NFS_MOUNT=True)
    client = create_worker_app(config, bridge=bridge, runtime_dir=tmp_path).test_client()

    assert answer(post_nfs_mount(client, None), 200)["nfs_state"] == "mounted"
    assert bridge.nfs_mounts == 1


def test_status_needs_no_token(client):
    answer(client.get(STATUS), 200)


@pytest.mark.parametrize("path", ["/", "/luksctl_api_wn/v1.0/nope", "/luksctl_api/v1.0/status"])
def test_unknown_routes_are_json_404_with_nfs_state(client, path):
    answer(client.get(path), 404)


def test_wrong_method_is_json_405_with_nfs_state(client):
    response = client.get(NFS_MOUNT)

    answer(response, 405)
    assert "POST" in response.headers["Allow"]


def test_unreadable_state_answers_unavailable(client, nfs, monkeypatch):
    def broken(mountpoints, **kwargs):
        raise PermissionError("/proc/self/mountinfo")

    monkeypatch.setattr(worker, "nfs_mount_states", broken)

    body = answer(client.get("/luksctl_api_wn/v1.0/status"), 200)
    assert body["nfs_state"] == "unavailable"
    assert body["error"] == "the mount table cannot be read"
    assert answer(client.get("/luksctl_api_wn/v1.0/nope"), 404)["nfs_state"] == "unavailable"
