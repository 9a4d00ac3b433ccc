"""A real Vault for the tests: an OpenBao dev server, started once per session.

Layout as the dashboard uses it (PROTOCOL §3): KV v2 at `secrets`, the secret at
`<sub>/<uuid>/storage_encryption`, key `storage_encryption_key`, and wrapping
tokens that wrap a child token with a read-only policy. Two KV v1 mounts exist
too: `kv1` (created with options.version=1) and `kv1plain` (plain `type: kv`,
what `bao secrets enable kv` makes, with no version option).

Besides that: a closed port ("Vault down"), a server that accepts TCP and
never answers, and an HTTPS server with a self-signed certificate.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from support.bao import KV2_ROOT, ROOT_TOKEN, SECRET_KEY, Bao, open_body  # noqa: F401 - the tests' names
from support.bridge import FakeBridge, Kernel
from support.secret_file import write_secret_file

from luksctl.api.certs import build_certificate

KV1_ROOT = "kv1"  # options.version = "1"
KV1_PLAIN_ROOT = "kv1plain"  # plain `type: kv`, options = {}
START_TIMEOUT = 30.0


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vault)


def in_thread(function, bound: float):
    """Runs function() in a thread and waits at most `bound` seconds: a test of a deadline must
    fail, not hang, on code without one. Returns (result or exception, seconds taken)."""
    outcome: list = []

    def target():
        try:
            outcome.append(function())
        except Exception as exc:  # the caller asserts on it
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    assert outcome, f"still running after {bound:g} s"
    return outcome[0], time.monotonic() - started


@contextlib.contextmanager
def running_bao(home: Path) -> Iterator[Bao]:
    """An OpenBao dev server with the dashboard's layout and two KV v1 mounts, its HOME and log
    in `home`; stopped on exit."""
    server = Bao(home, mounts={KV2_ROOT: "2", KV1_ROOT: "1", KV1_PLAIN_ROOT: None}, start_timeout=START_TIMEOUT)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bao(tmp_path_factory) -> Iterator[Bao]:
    with running_bao(tmp_path_factory.mktemp("bao-home")) as server:
        yield server


# Policies only the tests use, beside the dashboard's three (support.policies), defined once.
READ_WRITE = "luksctl-test-read-write"
ROTATE = "luksctl-test-rotate"  # read + update: what rotation needs
UPDATE_ONLY = "luksctl-test-update-only"
CREATE_READ = "luksctl-test-create-read"  # read, but no update: the new version could not be written
DELETE = "luksctl-test-delete"
TEST_POLICIES = {
    READ_WRITE: f'path "{KV2_ROOT}/data/*" {{ capabilities = ["create", "read", "update"] }}',
    ROTATE: f'path "{KV2_ROOT}/data/*" {{ capabilities = ["read", "update"] }}\npath "{KV1_ROOT}/*" {{ capabilities = ["read", "update"] }}',
    UPDATE_ONLY: f'path "{KV2_ROOT}/data/*" {{ capabilities = ["update"] }}',
    CREATE_READ: f'path "{KV2_ROOT}/data/*" {{ capabilities = ["create", "read"] }}',
    DELETE: f'path "{KV2_ROOT}/metadata/*" {{ capabilities = ["delete"] }}\npath "{KV1_ROOT}/*" {{ capabilities = ["delete", "read"] }}',
}


@pytest.fixture(scope="session")
def policies(bao) -> Bao:
    """The shared server with the tests' own policies too."""
    for name, rules in TEST_POLICIES.items():
        bao.put_policy(name, rules)
    return bao


@pytest.fixture
def own_bao(tmp_path) -> Iterator[Bao]:
    """A server of the test's own, for what would break the shared one (sealing it, say)."""
    with running_bao(tmp_path) as server:
        yield server


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    """A URL where nothing listens: the socket is bound, not listening, so connect() is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_server_url() -> Iterator[str]:
    """A server that accepts TCP connections and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


class _EmptyJsonHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with 200 and `{}`."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@dataclass(frozen=True)
class TlsServer:
    url: str
    ca_bundle: str  # the self-signed certificate: trusting it makes the TLS handshake succeed


@pytest.fixture(scope="session")
def self_signed_server(tmp_path_factory) -> Iterator[TlsServer]:
    """HTTPS with a self-signed certificate for 127.0.0.1 that no default trust store accepts."""
    directory = tmp_path_factory.mktemp("tls")
    cert_pem, key_pem = build_certificate(["localhost"], {ipaddress.ip_address("127.0.0.1")}, 1)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyJsonHandler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield TlsServer(f"https://127.0.0.1:{server.server_address[1]}", str(directory / "cert.pem"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- The front-end app with a fake privileged bridge -------------------------------------

OPEN_URL = "/luksctl_api/v1.0/open"
CRYPTDEV = "luksctl-vault-test"
MOUNTPOINT = "/export-vault-test"


@pytest.fixture
def fake_bridge() -> FakeBridge:
    return FakeBridge(Kernel())


@pytest.fixture
def make_frontend_app(tmp_path, fake_bridge, monkeypatch):
    """make_frontend_app(**settings): create_frontend_app with a tmp ini and lock file, and
    these FrontendConfig settings on top of VAULT_TIMEOUT=3.

    This host has no device-mapper, so the volume state the app reads from
    /sys and /proc would always be "unmounted"; the state follows the fake
    bridge instead, as it would on a node where `luksctl open` worked.
    """
    from luksctl.api import frontend
    from luksctl.config import FrontendConfig
    from luksctl.status import VolumeStatus

    ini = tmp_path / "luks-cryptdev.ini"
    ini.write_text(f"[luks]\nuuid = 0123abcd-4567-89ab-cdef-0123456789ab\ncryptdev = {CRYPTDEV}\nmountpoint = {MOUNTPOINT}\n")
    # Tests name many local servers: any URL is allowed here, as the operator may opt to.

    def fake_volume_status(cryptdev: str, mountpoint: str) -> VolumeStatus:
        assert (cryptdev, mountpoint) == (CRYPTDEV, MOUNTPOINT)
        return VolumeStatus("253:0" if fake_bridge.kernel.mounted else None, fake_bridge.kernel.mounted)

    monkeypatch.setattr(frontend, "volume_status", fake_volume_status)

    def make(**settings):
        config = FrontendConfig(**{"CRYPTDEV_INI": str(ini), "LOCK_FILE": str(tmp_path / "open.lock"), "VAULT_TIMEOUT": 3, "ALLOW_ANY_VAULT_URL": True, "ALLOW_PLAIN_HTTP": True, **settings})
        app = frontend.create_frontend_app(config, fake_bridge)
        app.testing = False  # answer the way production does: errors become JSON, never propagate
        return app

    return make


@pytest.fixture
def frontend_app(make_frontend_app):
    return make_frontend_app()


def post_open(app, body: dict):
    response = app.test_client().post(OPEN_URL, json=body)
    assert response.is_json, f"{response.status_code} answered {response.content_type}: {response.get_data(as_text=True)[:200]}"
    return response


def assert_error(response, status: int, volume_state: str = "unmounted") -> dict:
    body = response.get_json()
    assert response.status_code == status, body
    assert body["volume_state"] == volume_state
    assert isinstance(body["error"], str) and body["error"]
    return body


# --- Hostile or misbehaving servers on loopback ---------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


class LocalServer(http.server.ThreadingHTTPServer):
    """Records every request; `respond(seen, body)` gives (status, headers, body) to answer with.

    With `trickle` set, an answer goes out one byte per `trickle` seconds: every socket read
    gets its byte in time, so no per-read timeout ever fires.
    """

    daemon_threads = True

    def __init__(self, respond: Callable[[Seen, bytes], tuple[int, dict, bytes]]):
        super().__init__(("127.0.0.1", 0), _LocalHandler)
        self.respond = respond
        self.seen: list[Seen] = []
        self.trickle: Callable[[Seen], float] = lambda seen: 0.0
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _LocalHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        server: LocalServer = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        server.seen.append(seen)
        status, headers, payload = server.respond(seen, body)
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        raw = (head + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
        interval = server.trickle(seen)
        try:
            if not interval:
                self.wfile.write(raw)
            for byte in raw if interval else b"":
                if server.closing.wait(interval):
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:
            pass  # the client gave up: that is what the trickle tests expect
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[Callable[..., LocalServer]]:
    """local_server(respond) -> a started LocalServer; all are stopped after the test."""
    started: list[LocalServer] = []

    def start(respond: Callable[[Seen, bytes], tuple[int, dict, bytes]]) -> LocalServer:
        server = LocalServer(respond)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.closing.set()
        server.shutdown()
        server.server_close()


def json_answer(body: dict, status: int = 200) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


@pytest.fixture
def vault_front(bao, local_server) -> LocalServer:
    """A LocalServer that forwards every request to the real OpenBao, headers and body as
    received: it shows what Vault would get, and can trickle chosen answers."""
    session = requests.Session()
    session.trust_env = False

    def forward(seen: Seen, body: bytes) -> tuple[int, dict, bytes]:
        headers = {k: v for k, v in seen.headers.items() if k not in ("host", "content-length", "connection")}
        answer = session.request(seen.method, bao.url + seen.path, headers=headers, data=body, timeout=10)
        return answer.status_code, {"Content-Type": answer.headers.get("Content-Type", "application/json")}, answer.content

    return local_server(forward)


# The lifecycle commands' Vault options and what they leave in Vault (test_lifecycle_vault, test_reencrypt_vault).


def token_file(bao, tmp_path, policy: str, *, wrapped: bool = False, client_token: str | None = None) -> str:
    """A token made as the dashboard makes them, in a 0600 file (never argv); client_token: its chosen id."""
    body = {"policies": [policy], "ttl": "1h", **({"id": client_token} if client_token else {})}
    if wrapped:
        value = bao.request("POST", "auth/token/create", headers={"X-Vault-Wrap-TTL": "60s"}, json=body).json()["wrap_info"]["token"]
    else:
        value = bao.request("POST", "auth/token/create", json=body).json()["auth"]["client_token"]
    return write_secret_file(tmp_path / f"token-{policy}-{'wrapped' if wrapped else 'plain'}", value)


def vault_args(bao, secret_path: str, token: str, *, wrapped: bool = False, root: str = KV2_ROOT, kv_version: int = 2) -> list[str]:
    return ["--vault-url", bao.url, "--vault-allow-http", "--secret-root", root, "--secret-path", secret_path, "--kv-version", str(kv_version),
            "--wrapping-token-file" if wrapped else "--token-file", token]


def vault_value(bao, secret_path: str, root: str = KV2_ROOT, kv_version: int = 2) -> tuple[str, int | None]:
    if kv_version == 1:
        return bao.request("GET", f"{root}/{secret_path}").json()["data"][SECRET_KEY], None
    data = bao.request("GET", f"{root}/data/{secret_path}").json()["data"]
    return data["data"][SECRET_KEY], data["metadata"]["version"]
