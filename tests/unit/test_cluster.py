"""Worker fan-out against real HTTP servers on loopback: outcomes, deadline, token header."""

from __future__ import annotations

import http.server
import os
import threading
import time

import pytest
from fake_worker import Worker
from support.net import free_port

from luksctl.api import cluster
from luksctl.config import FrontendConfig
from luksctl.errors import ConfigError

TOKEN = "cluster-token-0123456789abcdef"


@pytest.fixture
def workers():
    """Starts loopback workers on 127.0.0.N (one port for all, as in production)."""
    started = []

    def start(behaviour: str, delay: float = 0.0) -> tuple[str, http.server.ThreadingHTTPServer]:
        host = f"127.0.0.{len(started) + 2}"
        server = http.server.ThreadingHTTPServer((host, port), Worker)
        server.behaviour, server.delay, server.tokens = behaviour, delay, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return host, server

    port = free_port()
    start.port = port
    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def client(port: int, *, read_timeout: float = 5, token: str | None = TOKEN) -> cluster.WorkerClient:
    return cluster.WorkerClient(scheme="http", port=port, verify=True, connect_timeout=1, read_timeout=read_timeout, token=token)


def test_every_outcome_is_reported_per_node(workers):
    mounted, _ = workers("ok")
    refused, _ = workers("refuse")
    broken, _ = workers("html")
    closed = "127.0.0.250"  # nothing listens there

    nodes = cluster.remount_workers(client(workers.port), [mounted, refused, broken, closed])

    assert nodes == {mounted: "mounted", refused: "refused", broken: "error", closed: "unreachable"}


def test_the_cluster_token_is_sent_to_every_worker(workers):
    hosts = [workers("ok") for _ in range(3)]

    cluster.remount_workers(client(workers.port), [host for host, _ in hosts])

    assert [server.tokens for _, server in hosts] == [[TOKEN]] * 3


def test_no_token_header_without_a_token(workers):
    host, server = workers("ok")

    cluster.remount_workers(client(workers.port, token=None), [host])

    assert server.tokens == [None]


def test_a_slow_worker_is_a_timeout_and_does_not_hold_the_others(workers):
    fast, _ = workers("ok")
    slow, _ = workers("slow", delay=10)

    started = time.monotonic()
    nodes = cluster.remount_workers(client(workers.port, read_timeout=1), [fast, slow])
    elapsed = time.monotonic() - started

    assert nodes == {fast: "mounted", slow: "timeout"}
    assert elapsed < 1 + 1 + 1, elapsed  # read timeout + connect timeout + margin, not the 10 s delay


def test_workers_are_called_in_parallel(workers):
    hosts = [workers("slow", delay=1)[0] for _ in range(8)]

    started = time.monotonic()
    nodes = cluster.worker_states(client(workers.port), hosts)
    elapsed = time.monotonic() - started

    assert set(nodes.values()) == {"mounted"}
    assert elapsed < 3, f"8 workers of 1 s each took {elapsed:.1f} s"


def test_a_redirecting_worker_is_an_error_and_is_not_followed(workers):
    elsewhere_host, elsewhere = workers("ok")
    redirecting, _ = workers("redirect", delay=f"http://{elsewhere_host}:{workers.port}/luksctl_api_wn/v1.0/nfs-mount")

    nodes = cluster.remount_workers(client(workers.port), [redirecting])

    assert nodes == {redirecting: "error"}
    assert elsewhere.tokens == [], "the redirect was followed, with the cluster token"


def test_a_worker_that_trickles_its_answer_is_a_timeout_at_the_deadline(workers):
    """One byte at a time: no read timeout fires; the call's own deadline does, so the call
    ends there and its pool thread is free again (fan_out alone stops waiting, not the call)."""
    trickling, _ = workers("trickle", delay=0.2)
    worker_client = client(workers.port, read_timeout=1)

    started = time.monotonic()
    outcome = worker_client.call(trickling, "GET", "status")

    assert outcome == "timeout"
    assert time.monotonic() - started < worker_client.deadline + 0.5


def test_ipv6_workers_get_a_bracketed_url():
    assert client(5000).url("fd00::2", "status") == "http://[fd00::2]:5000/luksctl_api_wn/v1.0/status"
    assert client(5000).url("wn1.example", "nfs-mount") == "http://wn1.example:5000/luksctl_api_wn/v1.0/nfs-mount"


def token_file_at(path, mode: int = 0o640, owner: int = 0):
    """A cluster token as install.sh leaves it (root, 0640) unless told otherwise."""
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    if os.geteuid() == 0:  # as root the file is root's; as anyone else it already is not
        os.chown(path, owner, -1)
    return path


def test_client_from_config_reads_the_token_and_ca_bundle(tmp_path):
    token_file = token_file_at(tmp_path / "cluster-token")
    config = FrontendConfig(
        INFRASTRUCTURE_CONFIGURATION="cluster", WN_IPS=["10.0.0.2"], CLUSTER_TOKEN_FILE=str(token_file), WN_CA_BUNDLE="/etc/luks/wn-ca.pem"
    )

    made = cluster.WorkerClient.from_config(config)

    assert (made.token, made.verify, made.scheme, made.port) == (TOKEN, "/etc/luks/wn-ca.pem", "https", 5000)


def test_a_missing_token_file_means_no_header_but_an_empty_one_is_an_error(tmp_path):
    assert cluster.read_token(tmp_path / "absent", missing_ok=True) is None
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "empty").chmod(0o640)
    with pytest.raises(ConfigError, match="empty"):
        cluster.read_token(tmp_path / "empty")


def test_a_token_readable_by_others_is_refused(tmp_path):
    path = token_file_at(tmp_path / "cluster-token", mode=0o644)

    with pytest.raises(ConfigError, match="readable by others") as caught:
        cluster.read_token(path, missing_ok=True)

    assert str(path) in caught.value.message and TOKEN not in caught.value.message


def test_a_token_writable_by_its_group_is_refused(tmp_path):
    path = token_file_at(tmp_path / "cluster-token", mode=0o660)

    with pytest.raises(ConfigError, match="not writable by group or others") as caught:
        cluster.read_token(path, missing_ok=True)

    assert str(path) in caught.value.message


def test_a_token_not_owned_by_root_is_refused(tmp_path):
    path = token_file_at(tmp_path / "cluster-token", owner=65534)
    assert path.stat().st_uid != 0

    with pytest.raises(ConfigError, match="must be owned by root") as caught:
        cluster.read_token(path, missing_ok=True)

    assert str(path) in caught.value.message


def test_the_front_end_refuses_an_unsafe_token_file(tmp_path):
    token_file = token_file_at(tmp_path / "cluster-token", mode=0o644)
    config = FrontendConfig(INFRASTRUCTURE_CONFIGURATION="cluster", WN_IPS=["10.0.0.2"], CLUSTER_TOKEN_FILE=str(token_file))

    with pytest.raises(ConfigError, match="readable by others"):
        cluster.WorkerClient.from_config(config)
