"""README, per-node outcomes: `tls-error` for a worker whose certificate is not in WN_CA_BUNDLE,
against a real TLS server on loopback with certificates made as `gen-cert` makes them."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import ssl
import threading
import time

import pytest
from fake_worker import Worker

from luksctl.api import cluster
from luksctl.api.certs import build_certificate

WORKER_IP = "127.0.0.2"


def certificate(directory, name: str, host: str | None = None, address: str = WORKER_IP) -> tuple:
    """gen-cert's kind of certificate, named after the host (as each worker's own is)."""
    cert, key = build_certificate([host or name], {ipaddress.ip_address(address)}, 1)
    (directory / f"{name}-cert.pem").write_bytes(cert)
    (directory / f"{name}-key.pem").write_bytes(key)
    return directory / f"{name}-cert.pem", directory / f"{name}-key.pem"


@pytest.fixture
def start_worker():
    """start(cert, key, address) -> port: a worker answering {"nfs_state": "mounted"} over TLS."""
    servers = []

    def start(cert, key, address: str = WORKER_IP) -> int:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = http.server.ThreadingHTTPServer((address, 0), Worker)
        server.behaviour, server.delay, server.tokens = "ok", 0.0, []
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tls_worker(tmp_path, start_worker):
    """A worker with its own self-signed certificate."""
    cert, key = certificate(tmp_path, "worker")
    return start_worker(cert, key), cert


def https_client(port: int, verify) -> cluster.WorkerClient:
    return cluster.WorkerClient(scheme="https", port=port, verify=verify, connect_timeout=2, read_timeout=5, token="t")


def test_a_worker_whose_certificate_is_not_in_the_bundle_is_a_tls_error(tls_worker, tmp_path):
    port, _ = tls_worker
    other_cert, _ = certificate(tmp_path, "another-worker")  # same address, another key

    assert cluster.remount_workers(https_client(port, str(other_cert)), [WORKER_IP]) == {WORKER_IP: "tls-error"}
    assert cluster.worker_states(https_client(port, True), [WORKER_IP]) == {WORKER_IP: "tls-error"}  # system CAs


def test_the_same_worker_with_its_certificate_in_the_bundle_is_mounted(tls_worker, tmp_path):
    port, cert = tls_worker
    other_cert, _ = certificate(tmp_path, "another-worker")
    bundle = tmp_path / "wn-ca-bundle.pem"  # README: the workers' certificates concatenated
    bundle.write_bytes(other_cert.read_bytes() + cert.read_bytes())

    assert cluster.remount_workers(https_client(port, str(bundle)), [WORKER_IP]) == {WORKER_IP: "mounted"}


def test_two_workers_with_the_same_host_name_both_verify_against_the_bundle(tmp_path, start_worker):
    """Both certificates named `localhost` (a host whose name resolves nowhere): OpenSSL finds a
    self-signed certificate in the bundle by its subject, so equal subjects hid one of them."""
    addresses = ["127.0.0.2", "127.0.0.3"]
    pairs = [certificate(tmp_path, f"worker-{n}", "localhost", address) for n, address in enumerate(addresses)]
    bundle = tmp_path / "wn-ca-bundle.pem"
    bundle.write_bytes(b"".join(cert.read_bytes() for cert, _ in pairs))

    for address, (cert, key) in zip(addresses, pairs, strict=True):
        port = start_worker(cert, key, address)
        assert cluster.remount_workers(https_client(port, str(bundle)), [address]) == {address: "mounted"}


def test_the_environments_ca_does_not_count_for_workers(tls_worker, monkeypatch):
    """SSL_CERT_FILE / SSL_CERT_DIR naming the worker's certificate change nothing: only WN_CA_BUNDLE does."""
    port, cert = tls_worker
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("SSL_CERT_DIR", str(cert.parent))

    assert cluster.remount_workers(https_client(port, True), [WORKER_IP]) == {WORKER_IP: "tls-error"}


def test_a_worker_silent_in_the_tls_handshake_is_a_timeout_at_the_connect_timeout():
    """Connected, then no TLS answer: the handshake is part of connecting (WN_CONNECT_TIMEOUT)."""
    with socket.create_server((WORKER_IP, 0)) as silent:
        client = https_client(silent.getsockname()[1], True)
        started = time.monotonic()
        nodes = cluster.remount_workers(client, [WORKER_IP])
        elapsed = time.monotonic() - started

    assert nodes == {WORKER_IP: "timeout"}
    # Below the read timeout, not near the connect timeout: a loaded host (mutmut at nice 19 beside
    # two VMs) took 3.8 s for a 2 s connect timeout.
    assert client.connect_timeout <= elapsed < client.read_timeout, elapsed
