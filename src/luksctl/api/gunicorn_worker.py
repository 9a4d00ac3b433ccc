"""gunicorn's gthread worker, made safe against slow clients (issue 10, item 6).

gthread gives each new connection a thread, which waits up to 5 s for a first byte and then
blocks on the TLS handshake and the request with no time limit: clients sending a byte
every 2 s held every thread of both workers, and status stopped answering.

Here the worker's event loop (one thread, non-blocking sockets) does the TLS handshake and
reads the whole request (head and body) into memory first. A thread is taken only for a
request that is complete, so it never waits on a client. A connection gets
REQUEST_READ_DEADLINE seconds from accept (or, kept alive, from its next request's first
byte) for all of that; then it is closed. A client outside ALLOWED_CLIENTS is known at
accept, but is answered only after its whole request has been read like any other (so it
gets an HTTP answer, not a reset): 403 from the event loop, and it never reaches a thread.

What a slow client can still hold: one socket and a buffer of at most MAX_BUFFERED bytes,
for REQUEST_READ_DEADLINE seconds, out of gunicorn's `worker_connections` per worker.
"""

from __future__ import annotations

import selectors
import ssl
import time
from functools import partial

from gunicorn import http
from gunicorn import sock as gunicorn_sock
from gunicorn.workers.gthread import TConn, ThreadWorker

from .. import audit
from .guards import client_allowed, refusal_message
from .gunicorn_errors import json_answer, state_body_of

# Handshake plus the whole request; a trickling client is cut off after this. As long as
# gunicorn.conf.py's keepalive (how long an idle client may hold a connection): 10 s cut
# off wrk's TLS handshakes in a VM starved by a loaded host (32 at once, done one by one).
REQUEST_READ_DEADLINE = 30.0
# More than the largest request gunicorn.conf.py lets through (request line + header limits)
# plus the 16 KiB body limit of /open; a request larger than this is handed on as it is, and
# gunicorn or the app refuse it from what is buffered.
MAX_BUFFERED = 64 * 1024
_RECV_SIZE = 64 * 1024


def _find_head_end(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    return -1 if end < 0 else end + 4


def _chunked_body_complete(body: bytes) -> bool:
    position = 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            return False
        try:
            size = int(body[position:line_end].split(b";", 1)[0].strip(), 16)
        except ValueError:
            return True  # malformed: gunicorn's parser refuses it from what is buffered
        if size == 0:
            return body.find(b"\r\n\r\n", line_end) >= 0  # optional trailers, then a blank line
        position = line_end + 2 + size + 2
        if position > len(body):
            return False


def request_complete(data: bytes) -> bool:
    """Whether `data` holds a whole HTTP/1.x request (head, and body by Content-Length or chunked)."""
    head_end = _find_head_end(data)
    if head_end < 0:
        return False
    content_length = 0
    chunked = False
    for line in data[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
        elif name == b"content-length":
            try:
                content_length = int(value.strip())
            except ValueError:
                return True  # malformed: gunicorn answers 400 from what is buffered
    body = data[head_end:]
    return _chunked_body_complete(body) if chunked else len(body) >= content_length


class ReadFirstThreadWorker(ThreadWorker):
    """gthread whose threads only ever see requests already read in full."""

    def init_process(self):
        # One TLS context per worker: gthread builds (and loads the key into) one per connection.
        self.tls_context = gunicorn_sock.ssl_context(self.cfg) if self.cfg.is_ssl else None
        self.reading: dict[TConn, float] = {}  # connection -> read deadline, oldest first
        super().init_process()

    def enqueue_req(self, conn):
        """Every way gthread hands a connection to a thread (accept, a kept-alive connection
        that became readable, bytes read ahead) passes here: read first, unless done."""
        buffered = conn.parser.unreader.buf.getvalue() if conn.parser is not None else b""
        if conn.initialized and request_complete(buffered):
            super().enqueue_req(conn)
        else:
            self._start_reading(conn)

    def _start_reading(self, conn):
        conn.sock.setblocking(False)
        if not conn.initialized:
            conn.refused = not client_allowed(self._allowed_clients(), conn.client[0] if conn.client else None)
            if self.tls_context is not None:
                try:
                    conn.sock = self.tls_context.wrap_socket(
                        conn.sock, server_side=True, do_handshake_on_connect=False,
                        suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
                except OSError:  # ENOTCONN: reset before we got to it; must not end the worker
                    self.nr_conns -= 1
                    conn.close()
                    return
            conn.handshake_done = self.tls_context is None
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.initialized = True  # TConn.init() would wrap the socket again
        conn.read_buffer = bytearray(conn.parser.unreader.take_buffered())
        self.reading[conn] = time.monotonic() + REQUEST_READ_DEADLINE
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        self._on_readable(conn, conn.sock)  # bytes are usually waiting already: no extra poll

    def _allowed_clients(self):
        return getattr(self.wsgi, "extensions", {}).get("luksctl_allowed_clients")

    def _on_readable(self, conn, _fileobj):
        try:
            if not conn.handshake_done:
                conn.sock.do_handshake()
                conn.handshake_done = True
            while len(conn.read_buffer) <= MAX_BUFFERED:
                data = conn.sock.recv(_RECV_SIZE)
                if not data:
                    self._drop(conn)  # the client went away before its request was whole
                    return
                conn.read_buffer += data
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass  # nothing more for now
        except OSError:  # ssl.SSLError included: a failed handshake, a reset
            self._drop(conn)
            return
        if len(conn.read_buffer) > MAX_BUFFERED or request_complete(bytes(conn.read_buffer)):
            self._stop_reading(conn)
            if conn.refused:
                self._refuse(conn)
            else:
                conn.parser.unreader.unread(bytes(conn.read_buffer))
                conn.read_buffer = bytearray()
                conn.sock.setblocking(True)
                super().enqueue_req(conn)

    def _stop_reading(self, conn):
        self.reading.pop(conn, None)
        self.poller.unregister(conn.sock)

    def _drop(self, conn):
        self._stop_reading(conn)
        self.nr_conns -= 1
        conn.close()

    def _refuse(self, conn):
        """403 JSON from the event loop: the answer fits the socket's send buffer, so it is
        written at once or not at all."""
        address = conn.client[0] if conn.client else None
        current_state = state_body_of(self.wsgi)
        if current_state is not None:
            message = refusal_message(address)
            try:
                conn.sock.send(json_answer(current_state, 403, "Forbidden", message))
            except OSError:
                pass
            audit.record(action="connection", client=address, outcome="denied", status=403,
                         duration_ms=0.0, error_class="CallerRefused")
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        """Also closes connections whose request was not whole within REQUEST_READ_DEADLINE
        (gthread's loop calls this about once a second)."""
        super().murder_pending()
        now = time.monotonic()
        expired = [conn for conn, deadline in self.reading.items() if deadline <= now]
        for conn in expired:
            self._drop(conn)
