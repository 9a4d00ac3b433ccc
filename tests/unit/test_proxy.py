"""The proxy as shipped: nginx with the configuration `luksctl-api proxy-config` writes, in front
of gunicorn with deploy/gunicorn.conf.py on a Unix socket, both real, on loopback.

127.0.0.1 and 127.0.0.2 are in ALLOWED_CLIENTS, 127.0.0.3 is not (the kernel routes all of
127/8 to lo, so a client picks its address by binding it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.net import free_port
from support.waiting import wait_until

from luksctl.api import proxy
from luksctl.api.admin import main_frontend, main_worker
from luksctl.errors import EXIT_CONFIG

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NGINX = "/usr/sbin/nginx"
ALLOWED, ALSO_ALLOWED, REFUSED = "127.0.0.1", "127.0.0.2", "127.0.0.3"
# nginx's workers drop to this user here; in a deployment to luksctl_proxy (both have a group of
# the same name, as nginx's `user` directive needs).
PROXY_USER = "daemon"
TLS = ssl._create_unverified_context()  # the self-signed certificate, as the dashboard's verify=False


class Stack:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = directory / "config.json"
        self.runtime = directory / "run"  # the service's private directory (lock, sqlite)
        self.sockets = directory / "sockets"  # gunicorn's socket, reachable by nginx's workers
        self.cert, self.key = directory / "cert.pem", directory / "key.pem"
        self.gunicorn_log = directory / "gunicorn.log"
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    def write_files(self) -> None:
        self.runtime.mkdir(mode=0o700)
        self.sockets.mkdir(mode=0o755)
        self.directory.chmod(0o755)
        self.config.write_text(json.dumps({
            "ALLOW_PLAIN_HTTP": False, "ALLOWED_CLIENTS": [f"{ALLOWED}/32", f"{ALSO_ALLOWED}/32"],
            "LOCK_FILE": str(self.runtime / "open.lock"), "CRYPTDEV_INI": str(self.directory / "none.ini")}))
        assert main_frontend(["gen-cert", "--cert", str(self.cert), "--key", str(self.key), "--hostname", "localhost"]) == 0

    def nginx_conf(self, name: str, socket_path: Path, port: int) -> Path:
        out = self.directory / f"{name}.conf"
        runtime = self.directory / f"{name}-proxy"
        runtime.mkdir(exist_ok=True)
        os.environ["LUKSCTL_API_CONFIG"] = str(self.config)
        try:
            assert main_frontend(["proxy-config", "--output", str(out), "--socket", str(socket_path), "--runtime-dir", str(runtime),
                                  "--user", PROXY_USER, "--cert", str(self.cert), "--key", str(self.key),
                                  "--listen", f"127.0.0.1:{port}"]) == 0
        finally:
            del os.environ["LUKSCTL_API_CONFIG"]
        return out

    def start(self, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        with log.open("ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=out, env=env, stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def start_nginx(self, name: str, socket_path: Path, port: int) -> None:
        conf = self.nginx_conf(name, socket_path, port)
        process = self.start([NGINX, "-c", str(conf)], self.directory / f"{name}.log")
        wait_until(lambda: process.poll() is None and _accepts(port), 30, f"nginx {name}", interval=0.1)

    def start_gunicorn(self) -> None:
        socket_path = self.sockets / "gunicorn.sock"
        process = self.start(
            [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py"), "--workers", "1",
             "--bind", f"unix:{socket_path}", "-m", "000", "luksctl.api:create_frontend_app()"],
            self.gunicorn_log, env={**os.environ, "LUKSCTL_API_CONFIG": str(self.config)})
        wait_until(lambda: process.poll() is None and socket_path.exists(), 30, "gunicorn", interval=0.1)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack():
    # Not under pytest's base directory: that is root's only (0700), and nginx's workers, which
    # are not root, must reach gunicorn's socket.
    directory = Path(tempfile.mkdtemp(prefix="luksctl-proxy-test."))
    stack = Stack(directory)
    stack.write_files()
    try:
        stack.start_gunicorn()
        stack.start_nginx("nginx", stack.sockets / "gunicorn.sock", stack.port)
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(directory)


def connect(port: int, source: str = ALLOWED, tls: bool = True) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return TLS.wrap_socket(sock) if tls else sock


def exchange(port: int, request: bytes, source: str = ALLOWED, tls: bool = True) -> tuple[int, dict]:
    """(status, JSON body) of one raw request; fails if the body is not JSON."""
    with connect(port, source, tls) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split(b" ")[1]), json.loads(body)


def get(path: str, *headers: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


STATUS = "/luksctl_api/v1.0/status"
OPEN_HEAD = b"POST /luksctl_api/v1.0/open HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"

# Each answer nginx makes itself, and a request that makes it.
NGINX_ANSWERS = {
    "malformed request line": (b"GARBAGE\r\n\r\n", 400, ALLOWED, True),
    "NUL in the path": (b"GET /luksctl_api/v1.0/sta\x00tus HTTP/1.1\r\nHost: x\r\n\r\n", 400, ALLOWED, True),
    "two Host fields": (get(STATUS, "Host: y"), 400, ALLOWED, True),
    "a 5,000-byte field": (get(STATUS, "X-Big: " + "a" * 5000), 400, ALLOWED, True),
    "a 5,000-byte request line": (get("/" + "a" * 5000), 414, ALLOWED, True),
    "HTTP/2.5": (b"GET / HTTP/2.5\r\nHost: x\r\n\r\n", 505, ALLOWED, True),
    "plain HTTP on the HTTPS port": (get(STATUS), 400, ALLOWED, False),
    "TRACE": (b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405, ALLOWED, True),
    "an error page's own path": (get("/luksctl-proxy-error-500"), 404, ALLOWED, True),
    "a body over 16 KiB": (OPEN_HEAD + b"Content-Length: 16385\r\n\r\n", 413, ALLOWED, True),
    "an unknown transfer coding": (OPEN_HEAD + b"Transfer-Encoding: gzip\r\n\r\n", 501, ALLOWED, True),
    "Content-Length with chunked": (OPEN_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, ALLOWED, True),
    "an address outside ALLOWED_CLIENTS": (get(STATUS), 403, REFUSED, True),
}


@pytest.mark.parametrize("case", sorted(NGINX_ANSWERS))
def test_every_answer_nginx_makes_itself_is_json_with_the_state_and_an_error(stack, case):
    request, expected, source, tls = NGINX_ANSWERS[case]

    status, body = exchange(stack.port, request, source, tls)

    assert status == expected
    assert body["volume_state"] == "unavailable" and body["error"]


def test_the_refusal_names_the_address_and_the_setting(stack):
    _, body = exchange(stack.port, get(STATUS), REFUSED)

    assert body["error"] == f"client address {REFUSED} is not in ALLOWED_CLIENTS"


def test_an_allowed_client_reaches_the_app_through_the_socket(stack):
    status, body = exchange(stack.port, get(STATUS))

    assert status == 200 and body["volume_state"] == "unavailable" and "none.ini" in body["error"]  # the app's own answer


def test_a_refused_address_is_answered_before_its_body_arrives(stack):
    """The refusal comes after the head: a body that never comes costs nothing."""
    with connect(stack.port, REFUSED) as sock:
        started = time.monotonic()
        sock.sendall(OPEN_HEAD + b"Content-Length: 10000\r\n\r\n")
        first = sock.recv(65536)
        waited = time.monotonic() - started

    assert first.startswith(b"HTTP/1.1 403 ") and waited < proxy.CLIENT_TIMEOUT / 2


def audit_clients(log: Path) -> list[str]:
    return [json.loads(line)["client"] for line in log.read_text().splitlines() if line.startswith('{"audit"')]


@pytest.mark.parametrize("header", ["X-Forwarded-For: 10.1.2.3", "X-Real-IP: 10.1.2.3", "Forwarded: for=10.1.2.3",
                                    f"X-Forwarded-For: {ALLOWED}"])
def test_a_client_sent_forwarding_header_changes_nothing(stack, header):
    before = len(audit_clients(stack.gunicorn_log))

    audited = OPEN_HEAD + f"{header}\r\nContent-Length: 2\r\n\r\n{{}}".encode()  # status polls are not audited
    allowed_status, _ = exchange(stack.port, audited, ALSO_ALLOWED)
    refused_status, _ = exchange(stack.port, audited, REFUSED)

    assert (allowed_status, refused_status) == (400, 403)
    wait_until(lambda: len(audit_clients(stack.gunicorn_log)) > before, 10, "the audit line", interval=0.1)
    assert audit_clients(stack.gunicorn_log)[before:] == [ALSO_ALLOWED]


def test_past_the_requests_in_progress_one_address_may_have_the_next_gets_429(stack):
    with ExitStack() as held:
        for _ in range(proxy.CONNECTIONS_PER_CLIENT):
            sock = held.enter_context(connect(stack.port, ALSO_ALLOWED))
            sock.sendall(OPEN_HEAD + b"Content-Length: 100\r\n\r\n{")  # in progress: the body trickles
        time.sleep(0.5)  # nginx counts a request once its head is read

        status, body = exchange(stack.port, get(STATUS), ALSO_ALLOWED)
        other_status, _ = exchange(stack.port, get(STATUS), ALLOWED)

    assert status == 429 and f"at most {proxy.CONNECTIONS_PER_CLIENT}" in body["error"]
    assert other_status == 200  # the limit is per address


def test_502_in_json_when_gunicorn_is_not_running(stack):
    port = free_port()
    stack.start_nginx("nginx-no-upstream", stack.directory / "no-such.sock", port)

    status, body = exchange(port, get(STATUS))

    assert status == 502 and "not running" in body["error"]


# --- the generated configuration ------------------------------------------------------------

def render(tmp_path: Path, config: dict, main=main_frontend, *extra: str) -> tuple[int, str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "nginx.conf"
    os.environ["LUKSCTL_API_CONFIG"] = str(path)
    try:
        code = main(["proxy-config", "--output", str(out), "--user", PROXY_USER, "--runtime-dir", str(tmp_path), *extra])
    finally:
        del os.environ["LUKSCTL_API_CONFIG"]
    return code, out.read_text() if out.exists() else ""


def test_without_a_certificate_the_proxy_refuses_unless_plain_http_is_allowed(tmp_path, capsys):
    missing = ["--cert", str(tmp_path / "no-cert.pem"), "--key", str(tmp_path / "no-key.pem")]

    code, _ = render(tmp_path, {}, main_frontend, *missing)
    assert code == EXIT_CONFIG and "refusing to serve plain HTTP" in capsys.readouterr().err

    code, text = render(tmp_path, {"ALLOW_PLAIN_HTTP": True}, main_frontend, *missing)
    assert code == 0 and re.search(r"listen 0\.0\.0\.0:5000;", text) and "ssl_certificate" not in text


def test_allowed_clients_come_from_config_json_and_none_means_no_rule(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("")
    files = ["--cert", str(cert), "--key", str(cert)]

    _, listed = render(tmp_path, {"ALLOWED_CLIENTS": ["10.0.0.0/8", "192.0.2.7/32"]}, main_frontend, *files)
    _, open_to_all = render(tmp_path, {}, main_frontend, *files)

    assert re.findall(r"allow (\S+);|deny (\S+);", listed) == [("10.0.0.0/8", ""), ("192.0.2.7/32", ""), ("", "all")]
    assert "allow " not in open_to_all and "deny " not in open_to_all


def test_the_worker_proxy_answers_with_nfs_state_and_passes_nginx_t(tmp_path, stack):
    code, text = render(tmp_path, {"NFS_MOUNTPOINT_LIST": ["/home"]}, main_worker, "--cert", str(stack.cert), "--key", str(stack.key))

    assert code == 0 and '"nfs_state": "unavailable"' in text and "volume_state" not in text
    assert "/run/luksctl-api-wn/gunicorn.sock" in text
    conf = tmp_path / "nginx.conf"
    subprocess.run([NGINX, "-t", "-q", "-c", str(conf)], check=True)


def test_every_code_nginx_may_answer_has_a_json_page(stack):
    text = (stack.directory / "nginx.conf").read_text()

    pages = {int(code) for code in re.findall(r"error_page (\d+) ", text)}

    assert pages == set(proxy.ERRORS)


def test_a_head_nginx_lets_through_reaches_the_app_whole(stack):
    """gunicorn's own head limits (deploy/gunicorn.conf.py) must not be tighter than nginx's: 150
    short fields fit nginx's 17 KiB but not gunicorn's default of 100 fields."""
    fields = [f"X-Field-{n}: {n}" for n in range(150)]

    status, body = exchange(stack.port, get(STATUS, *fields))

    assert status == 200 and "none.ini" in body["error"]  # the app's own answer
