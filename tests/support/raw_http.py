"""Raw requests to the proxy on loopback, and each answer nginx makes itself (with a request
that makes it): for what an HTTP client library will not send.

The kernel routes all of 127/8 to lo, so a client picks its address by binding it: the proxy
tests put ALLOWED and ALSO_ALLOWED in ALLOWED_CLIENTS, and not REFUSED.
"""

from __future__ import annotations

import json
import socket
import ssl

ALLOWED, ALSO_ALLOWED, REFUSED = "127.0.0.1", "127.0.0.2", "127.0.0.3"
# The self-signed certificate, as the dashboard's verify=False: nothing checked, nothing loaded.
TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
TLS.check_hostname = False
TLS.verify_mode = ssl.CERT_NONE


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
