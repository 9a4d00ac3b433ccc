"""Tools for the fault-injection and bad-input tests (test_faults.py): a Vault proxy that can
count, delay, hold or cut requests, a cryptsetup wrapper that misbehaves, raw HTTPS clients
for requests no library would send, and the checks that a volume is whole.

Everything runs in the test process (threads, not processes): starting a process costs seconds
under software emulation.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers_vm import API_PORT, CRYPTSETUP, MOUNTPOINT
from support.net import free_port
from support.proc import processes
from support.shim import install_shim, remove_shim

# --------------------------------------------------------------------------------------------
# A TCP proxy in front of OpenBao
# --------------------------------------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"(?m)^(GET|POST|PUT|DELETE|LIST|HEAD|PATCH) (\S+) HTTP/1\.[01]\r?$")
_CREDENTIAL_HEADER = re.compile(rb"(?im)^(x-vault-token|authorization|proxy-authorization): *(\S+)\r?$")


class VaultProxy:
    """Listens on 127.0.0.1:<port> and forwards to OpenBao, seeing every HTTP request line.

    hold(path): a request for that path (and everything after it on its connection) waits until
    release(); held() tells when one arrived. delay: seconds added before forwarding each
    request. trickle: Vault's answers go back one byte per `trickle` seconds. credentials:
    every token or Authorization header the requests carried. The port stays the same for the
    whole session, so it can sit in an allowlist.
    """

    def __init__(self, upstream_port: int, name: str) -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.delay = 0.0
        self.trickle = 0.0
        self.requests: list[tuple[str, str]] = []  # (method, path), in arrival order
        self.credentials: list[tuple[str, str]] = []  # (lower-cased header name, value)
        self.connections = 0
        self._hold_path: str | None = None
        self._held = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name=f"proxy-{self.name}").start()

    def stop(self) -> None:
        """Stops listening and cuts every connection (held requests are dropped, not sent)."""
        self._release.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def reset(self) -> None:
        """Forward everything at once again and forget what was seen."""
        self._release.set()
        self.delay = 0.0
        self.trickle = 0.0
        self._hold_path = None
        self._held.clear()
        with self._lock:
            self.requests.clear()
            self.credentials.clear()
            self.connections = 0

    def hold(self, path: str) -> None:
        self._release.clear()
        self._held.clear()
        self._hold_path = path

    def release(self) -> None:
        self._hold_path = None
        self._release.set()

    def wait_held(self, timeout: float) -> None:
        if not self._held.wait(timeout):
            raise TimeoutError(f"proxy {self.name}: no request for {self._hold_path} within {timeout} s; saw {self.requests}")

    def paths(self) -> list[str]:
        with self._lock:
            return [path for _, path in self.requests]

    # -- pumps ----------------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self.connections += 1
                self._sockets.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            _close(client)  # Vault is down: the caller sees its connection closed
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.add(upstream)
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        holding = False
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if from_client:
                    with self._lock:
                        self.credentials += [(name.decode().lower(), value.decode()) for name, value in _CREDENTIAL_HEADER.findall(chunk)]
                    for method, path in _REQUEST_LINE.findall(chunk):
                        with self._lock:
                            self.requests.append((method.decode(), path.decode(errors="replace")))
                        if self._hold_path and path.decode(errors="replace").startswith(self._hold_path):
                            holding = True
                    if holding:
                        self._held.set()
                        self._release.wait(600)
                    if self.delay:
                        time.sleep(self.delay)
                elif self.trickle:
                    for byte in chunk:  # every read gets a byte in time; the answer never ends
                        time.sleep(self.trickle)
                        sink.sendall(bytes([byte]))
                    continue
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# --------------------------------------------------------------------------------------------
# HTTPS clients for what requests would not send
# --------------------------------------------------------------------------------------------


def insecure_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """Accepts the service's self-signed certificate; `maximum` caps the TLS version offered.

    SECLEVEL=0 lets this client offer TLS 1.0/1.1 at all, so a refused handshake is the
    server's refusal, not OpenSSL's client-side policy.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float = 0.0
    data: dict = field(default_factory=dict)

    def json(self) -> dict:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"{self.status} {self.headers.get('content-type')} {self.body[:300]!r}"


def https(method: str, path: str, body: bytes | None = None, headers: dict | None = None, *,
          source: str = "127.0.0.1", port: int = API_PORT, timeout: float = 60) -> Answer:
    """One request from `source` (any 127.0.0.0/8 address works: they are all on lo)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=insecure_context(),
                                       source_address=(source, 0))
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                      time.monotonic() - started)
    finally:
        conn.close()


def post_json(path: str, payload, *, source: str = "127.0.0.1", timeout: float = 60) -> Answer:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return https("POST", path, body, {"Content-Type": "application/json"}, source=source, timeout=timeout)


def raw_https(data: bytes, *, port: int = API_PORT, timeout: float = 30) -> Answer:
    """Sends bytes as they are over TLS and parses whatever comes back as one HTTP answer."""
    with (socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock,
          insecure_context().wrap_socket(sock) as tls):
        tls.sendall(data)
        received = b""
        with contextlib.suppress(socket.timeout, ssl.SSLError, ConnectionResetError):
            while chunk := tls.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not match:
        raise AssertionError(f"no HTTP answer to {data[:80]!r}: {received[:200]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(match.group(1)), headers, body)


def expect_json_error(answer: Answer, status: int, state: str | None = None) -> dict:
    """The rule of PROTOCOL §3: every answer is JSON with volume_state, errors with `error`."""
    assert answer.status == status, f"expected {status}, got {answer}"
    assert answer.headers.get("content-type", "").startswith("application/json"), f"not JSON: {answer}"
    try:
        body = answer.json()
    except ValueError:
        raise AssertionError(f"body is not JSON: {answer}") from None
    assert isinstance(body, dict) and "volume_state" in body, f"no volume_state: {answer}"
    if state is not None:
        assert body["volume_state"] == state, f"volume_state {body['volume_state']!r}, expected {state!r}: {answer}"
    if status >= 400:
        assert isinstance(body.get("error"), str) and body["error"], f"no error message: {answer}"
        assert "Traceback" not in body["error"], answer
    return body


# --------------------------------------------------------------------------------------------
# What the kernel says about the volume
# --------------------------------------------------------------------------------------------


def mapper_device(cryptdev: str) -> str | None:
    """major:minor of the dm device named `cryptdev`, from /sys/block/dm-*/dm/name."""
    for name in Path("/sys/block").glob("dm-*/dm/name"):
        with contextlib.suppress(FileNotFoundError):
            if name.read_text().strip() == cryptdev:
                return (name.parent.parent / "dev").read_text().strip()
    return None


def mounts_on(mountpoint: Path = MOUNTPOINT) -> list[tuple[str, str]]:
    """(major:minor, fstype) of every mount on `mountpoint`, bottom first, from mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        sep = fields.index("-", 6)
        if fields[4] == str(mountpoint):
            found.append((fields[2], fields[sep + 1]))
    return found


def volume_shape(cryptdev: str) -> str:
    """'open' (mapped and mounted on top of the mountpoint), 'closed' (neither), or a
    description of the half-open state it is in."""
    device = mapper_device(cryptdev)
    mounts = mounts_on()
    ours = [m for m in mounts if device and m[0] == device]
    if device and ours and mounts[-1][0] == device:
        return "open"
    if not device:
        return "closed"
    if ours:
        return f"half-open: {cryptdev} ({device}) is mounted but hidden under {mounts[-1]}"
    return f"half-open: {cryptdev} ({device}) is mapped but not mounted on {MOUNTPOINT} (mounts there: {mounts})"


def assert_whole(cryptdev: str, reported: str) -> str:
    """The volume is fully open or fully closed, and the API's volume_state says which."""
    shape = volume_shape(cryptdev)
    assert shape in ("open", "closed"), shape
    assert reported == {"open": "mounted", "closed": "unmounted"}[shape], f"API says {reported}, kernel says {shape}"
    return shape


# --------------------------------------------------------------------------------------------
# gunicorn's processes
# --------------------------------------------------------------------------------------------


def gunicorn_pids(master: int) -> tuple[int, tuple[int, ...]]:
    """The master and its gunicorn worker children (not the sudo calls a worker may run)."""
    workers = [pid for pid, process in processes().items()
               if process.ppid == master and any(b"gunicorn" in arg for arg in process.argv)]
    return master, tuple(sorted(workers))


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


@contextlib.contextmanager
def same_gunicorn(master: int):
    """Nothing in the block may kill or recycle gunicorn's master or workers."""
    before = gunicorn_pids(master)
    assert len(before[1]) >= 1, f"gunicorn {master} has no workers"
    yield before
    after = gunicorn_pids(master)
    assert after == before, f"gunicorn processes changed: {before} -> {after}"
    status = https("GET", "/luksctl_api/v1.0/status", timeout=30)
    expect_json_error(status, 200)


def nginx_pids(master: int) -> tuple[int, tuple[int, ...]]:
    """The proxy's master and its worker processes."""
    workers = sorted(pid for pid, process in processes().items() if process.ppid == master)
    return master, tuple(workers)


@contextlib.contextmanager
def same_proxy(master: int):
    """Nothing in the block may kill or recycle nginx's master or workers."""
    before = nginx_pids(master)
    assert len(before[1]) >= 1, f"nginx {master} has no workers"
    yield
    after = nginx_pids(master)
    assert after == before, f"nginx processes changed: {before} -> {after}"


# --------------------------------------------------------------------------------------------
# A cryptsetup that misbehaves for `open` only
# --------------------------------------------------------------------------------------------


class CryptsetupFault:
    """Put at /usr/local/sbin/cryptsetup, which luksctl finds first on its fixed PATH.

    mode "hang":       `open` records its pid, then sleeps until killed (sleep keeps the pid).
    mode "kill-after": runs the real `open` (the mapping is made), then SIGKILLs itself, as the
                       OOM killer or a timeout would after the kernel did the work.
    Every other subcommand runs the real cryptsetup.
    """

    pidfile = Path("/run/faults-cryptsetup.pid")

    def install(self, mode: str) -> None:
        self.pidfile.unlink(missing_ok=True)
        if mode == "hang":
            action = f'echo $$ > {self.pidfile}; exec sleep 3600'
        elif mode == "kill-after":
            action = f'{CRYPTSETUP} "$@"; echo $$ > {self.pidfile}; kill -KILL $$'
        else:
            raise ValueError(mode)
        install_shim("cryptsetup", f'if [ "$1" = open ]; then {action}; fi\nexec {CRYPTSETUP} "$@"\n')

    def wait_pid(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(self.pidfile.read_text())
            time.sleep(0.2)
        raise TimeoutError(f"cryptsetup open did not start within {timeout} s")

    def remove(self) -> None:
        remove_shim("cryptsetup")
        self.pidfile.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Slow clients (slowloris): connections that send one byte every few seconds
# --------------------------------------------------------------------------------------------


def client_hello() -> bytes:
    """The first flight of a real TLS client, to be trickled to the server byte by byte."""
    tls = insecure_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@dataclass
class SlowConnection:
    source: str
    stage: str  # "handshake": trickles a ClientHello; "headers": trickles a request over TLS
    sock: socket.socket | ssl.SSLSocket
    payload: bytes
    opened: float
    sent: int = 0
    closed: float | None = None


# Issue 20's attacks at the review's sizes, for the VM test and scripts/bench_slow_clients.py:
# name -> ([(source, stage, connections)], seconds between two bytes of each). 127.0.0.2 is an
# allowed address that attacks, 127.0.0.3 a refused one.
ATTACKS = {
    "chunked-body-from-a-refused-address": ([("127.0.0.3", "chunked", 120)], 0.2),
    "chunked-body-from-an-allowed-address": ([("127.0.0.2", "chunked", 120)], 0.2),
    "idle-connects-from-a-refused-address": ([("127.0.0.3", "idle", 2000)], 1.0),
    "trickled-tls-handshakes": ([("127.0.0.3", "handshake", 64)], 0.2),
}


class SlowClients:
    """Holds `count` connections per (source, stage) open, from one thread, each sending one
    byte every `interval` seconds: "handshake" trickles a TLS ClientHello, "headers" a request
    head, "chunked" a chunked request body (its head sent whole); "idle" connects and sends
    nothing. A connection the server closes is replaced, at most REPLACE_PER_TICK per tick (the
    attacker shares the VM's emulated CPUs with the server); `lifetimes()` says how long the
    server let each one live."""

    REQUEST = b"GET /luksctl_api/v1.0/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    CHUNKED_HEAD = (b"POST /luksctl_api/v1.0/open HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
    CHUNKED_BODY = b"1\r\na\r\n" * 4096  # ends before the last chunk: never complete
    REPLACE_PER_TICK = 10

    def __init__(self, groups: list[tuple[str, str, int]], interval: float = 2.0) -> None:
        self.groups = groups
        self.interval = interval
        self.live: list[SlowConnection] = []
        self.ended: list[SlowConnection] = []
        self.connect_failures = 0
        self._stop = threading.Event()
        self.all_connected = threading.Event()  # every first connection made (or failed)
        self._thread = threading.Thread(target=self._run, daemon=True)
        # 2,000 idle connections need more descriptors than the default 1,024.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 4 + 2 * sum(count for _, _, count in groups)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, 1024), max(hard, wanted)))

    def _connect(self, source: str, stage: str) -> None:
        try:
            raw = socket.create_connection(("127.0.0.1", API_PORT), timeout=10, source_address=(source, 0))
        except OSError:
            self.connect_failures += 1
            return
        if stage in ("handshake", "idle"):
            sock, payload = raw, client_hello() if stage == "handshake" else b""
        else:
            try:
                sock = insecure_context().wrap_socket(raw)
                if stage == "chunked":
                    sock.sendall(self.CHUNKED_HEAD)
            except OSError:  # the handshake did not finish in 10 s
                raw.close()
                self.connect_failures += 1
                return
            payload = self.CHUNKED_BODY if stage == "chunked" else self.REQUEST
        self.live.append(SlowConnection(source, stage, sock, payload, time.monotonic()))

    def _closed_by_server(self, conn: SlowConnection) -> bool:
        try:
            conn.sock.setblocking(False)
            try:
                return conn.sock.recv(1) in (b"", b"H")  # EOF, or an answer (a refusal: 403, 429)
            finally:
                conn.sock.setblocking(True)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            return True

    def _run(self) -> None:
        for source, stage, count in self.groups:
            for _ in range(count):
                if not self._stop.is_set():
                    self._connect(source, stage)
        self.all_connected.set()
        while not self._stop.wait(self.interval):
            replaced = 0
            for conn in list(self.live):
                try:
                    if not self._closed_by_server(conn):
                        if conn.stage == "idle":
                            continue
                        if conn.sent < len(conn.payload) - 1:
                            conn.sock.send(conn.payload[conn.sent:conn.sent + 1])  # never the last byte
                            conn.sent += 1
                            continue
                except OSError:
                    pass
                conn.closed = time.monotonic()
                conn.sock.close()
                self.live.remove(conn)
                self.ended.append(conn)
                if replaced < self.REPLACE_PER_TICK:
                    replaced += 1
                    self._connect(conn.source, conn.stage)

    def __enter__(self) -> "SlowClients":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        for conn in self.live:
            conn.sock.close()

    def open_count(self) -> int:
        return len(self.live)

    def lifetimes(self) -> list[float]:
        return [conn.closed - conn.opened for conn in self.ended]
