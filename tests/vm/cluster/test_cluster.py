"""Cluster mode end to end: real NFS from the front end to three worker hosts (network namespaces).

The front end is the VM's root namespace (luksctl-api + the kernel NFS server); each worker is
a namespace running luksctl-api-wn exactly as its unit does. See cluster_lab.py.
"""

from __future__ import annotations

import secrets
import time

from cluster_lab import MOUNTPOINT, NFS_MNT
from conftest import WN_CONNECT_TIMEOUT, WN_READ_TIMEOUT, record_timing

TOKEN_HEADER = "X-Luksctl-Token"
# Scheduling slack under software emulation, on top of the product's own deadline.
MARGIN = 5


def read_through_nfs(worker, name: str, timeout: float = 90) -> tuple[str, float]:
    """cat inside the worker's mount namespace; retried while the NFS server's grace period
    (every nfsd start opens one) still refuses OPEN. Returns (content, seconds waited)."""
    started = time.monotonic()
    while True:
        result = worker.in_node("timeout", "30", "cat", str(NFS_MNT / name), check=False)
        if result.returncode == 0:
            return result.stdout.decode(), time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{worker.name} cannot read {name} over NFS: {result.stderr.decode(errors='replace')}")
        time.sleep(1)


def test_open_remounts_every_worker_and_they_read_the_encrypted_filesystem(cluster):
    lab = cluster.lab
    for worker in cluster.workers:
        response = worker.status()  # verified against the worker's own gen-cert certificate
        assert response.status_code == 200
        assert response.json() == {"nfs_state": "unmounted"}
    started = time.monotonic()
    cluster.volumes("cluster passphrase")  # the front end needs a volume description for its state
    nodes = cluster.nodes()
    record_timing("nodes_all_up_s", time.monotonic() - started)
    assert nodes.status_code == 200, nodes.text
    assert nodes.json() == {"volume_state": "unmounted", "nodes": {ip: "unmounted" for ip in lab.ips}}

    reply, sent, answered = cluster.open()
    record_timing("open_3_workers_s", answered - sent)
    assert reply.response.status_code == 200, reply.response.text
    body = reply.response.json()
    assert body["volume_state"] == "mounted"
    assert body["nodes"] == {ip: "mounted" for ip in lab.ips}

    calls = lab.systemctl.calls()
    assert [call["args"] for call in calls] == ["restart nfs-kernel-server"]
    assert calls[0]["rc"] == 0
    record_timing("fan_out_remount_3_s", answered - calls[0]["end"])

    name = f"written-on-the-front-end-{secrets.token_hex(4)}"
    content = f"encrypted data {secrets.token_hex(8)}\n"
    (MOUNTPOINT / name).write_text(content)  # as root, on the mounted LUKS filesystem
    for worker in cluster.workers:
        assert worker.nfs_mounted()
        seen, waited = read_through_nfs(worker, name)
        assert seen == content
        record_timing(f"{worker.name}_first_read_s", waited)

    nodes = cluster.nodes()
    assert nodes.json() == {"volume_state": "mounted", "nodes": {ip: "mounted" for ip in lab.ips}}

    # Where a remount's time goes, measured on one worker alone: the mount itself, then the
    # whole API call (sudo + the luksctl interpreter + the mount).
    first = cluster.workers[0]
    first.umount_nfs()
    started = time.monotonic()
    first.in_node("mount", "-a", "-t", "nfs,nfs4")
    record_timing("one_worker_mount_only_s", time.monotonic() - started)
    first.umount_nfs()
    started = time.monotonic()
    response = first.nfs_mount({TOKEN_HEADER: lab.token})
    record_timing("one_worker_nfs_mount_api_s", time.monotonic() - started)
    assert response.status_code == 200 and response.json()["nfs_state"] == "mounted", response.text


def test_a_dead_and_a_hung_worker_cost_at_most_the_deadline(cluster):
    healthy, dead, hung = cluster.workers
    deadline = WN_CONNECT_TIMEOUT + WN_READ_TIMEOUT + 1  # cluster.WorkerClient.deadline
    dead.kill()  # its address still answers: connection refused
    hung.freeze()  # SIGSTOP: the kernel accepts the TCP connection, TLS never answers
    try:
        reply, sent, answered = cluster.open()
        assert reply.response.status_code == 200, reply.response.text
        body = reply.response.json()
        assert body["volume_state"] == "mounted"
        assert body["nodes"][healthy.ip] == "mounted"
        assert body["nodes"][dead.ip] == "unreachable"
        assert body["nodes"][hung.ip] == "timeout"  # connected, then silent (README: per-node outcomes)
        # The fan-out starts when `luksctl open` returns, just after the NFS restart.
        restarted = cluster.lab.systemctl.calls()[-1]["end"]
        fan_out = answered - restarted
        record_timing("fan_out_one_dead_one_hung_s", fan_out)
        # The hung node is given up after WN_CONNECT_TIMEOUT already (the TLS handshake runs
        # under the connect timeout, and its timeout is "timeout"), so the
        # fan-out lasts as long as the healthy node's real remount, never past the deadline.
        assert fan_out <= deadline + MARGIN, fan_out
        assert healthy.nfs_mounted() and not dead.running

        started = time.monotonic()
        nodes = cluster.nodes()
        elapsed = time.monotonic() - started
        record_timing("nodes_one_dead_one_hung_s", elapsed)
        assert elapsed <= deadline + MARGIN
        states = nodes.json()["nodes"]
        assert states[healthy.ip] == "mounted"
        assert states[dead.ip] == "unreachable"
        assert states[hung.ip] == "timeout"
    finally:
        hung.kill()  # thawed it would run the queued nfs-mount after our teardown; the next test restarts both


def test_workers_refuse_nfs_mount_without_the_front_ends_token(cluster):
    lab = cluster.lab
    guarded, other, odd = cluster.workers
    for headers in ({}, {TOKEN_HEADER: "not-the-cluster-token"}, {TOKEN_HEADER: lab.token[:-1]}):
        response = guarded.nfs_mount(headers)
        assert response.status_code == 403, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json()["nfs_state"] == "unmounted"
        assert TOKEN_HEADER in response.json()["error"]
    assert not guarded.nfs_mounted()

    # A worker that holds another cluster's token refuses the front end.
    odd.write_token(secrets.token_urlsafe(32))
    odd.restart()
    reply, sent, answered = cluster.open()
    assert reply.response.status_code == 200, reply.response.text
    body = reply.response.json()
    assert body["volume_state"] == "mounted"
    assert body["nodes"] == {guarded.ip: "mounted", other.ip: "mounted", odd.ip: "refused"}
    assert not odd.nfs_mounted()
    assert guarded.nfs_mounted() and other.nfs_mounted()
