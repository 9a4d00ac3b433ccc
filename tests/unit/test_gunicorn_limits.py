"""deploy/gunicorn.conf.py's request-head limits, enforced by a real gunicorn on loopback.

The head is buffered whole before a thread sees it (MAX_BUFFERED): 32 fields of at most
1 KiB each keep it bounded. The VM's 9,000-byte field is refused by gunicorn's own default
(8190) too, so only requests just over these limits show that the file sets them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.net import free_port
from support.waiting import wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
STATUS = b"GET /luksctl_api/v1.0/status HTTP/1.1\r\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The front end under gunicorn with the shipped config, plain HTTP on 127.0.0.1."""
    directory = tmp_path_factory.mktemp("gunicorn")
    config = directory / "config.json"
    config.write_text(json.dumps({"ALLOW_PLAIN_HTTP": True, "LOCK_FILE": str(directory / "open.lock"),
                                  "CRYPTDEV_INI": str(directory / "luks-cryptdev.ini")}))  # none: status answers "unavailable"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py"), "--workers", "1",
         "--bind", f"127.0.0.1:{port}", "luksctl.api:create_frontend_app()"],
        env={**os.environ, "LUKSCTL_API_CONFIG": str(config)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: server.poll() is None and _accepts(port), 30, "gunicorn", interval=0.1)  # ~1 s; more on a loaded host
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def status_line(port: int, fields: list[bytes]) -> bytes:
    """The status line gunicorn answers a status request whose head has exactly `fields`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(STATUS + b"".join(field + b"\r\n" for field in fields) + b"\r\n")
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def head(count: int) -> list[bytes]:
    """`count` fields, Host and Connection among them."""
    return [b"Host: x", b"Connection: close", *(b"X-%d: a" % n for n in range(count - 2))]


def test_32_header_fields_are_served_and_33_refused(served):
    assert status_line(served, head(32)) == b"HTTP/1.1 200 OK"
    assert status_line(served, head(33)) == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_a_1_kib_field_is_served_and_a_1_5_kib_one_refused(served):
    def field(size: int) -> bytes:
        return b"X-Big: " + b"a" * (size - len(b"X-Big: "))

    assert status_line(served, [*head(2), field(1000)]) == b"HTTP/1.1 200 OK"
    assert status_line(served, [*head(2), field(1536)]) == b"HTTP/1.1 431 Request Header Fields Too Large"
