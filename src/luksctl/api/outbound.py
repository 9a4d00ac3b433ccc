"""Outgoing HTTP (to Vault, to workers) that sends only what we pass and ends when we say.

By default requests takes proxies, CA bundles and `.netrc` credentials from the
environment, and follows redirects, carrying our headers and body to wherever
the server points. Its timeout bounds each socket read, not the request, so a
server that sends one byte per second holds the caller forever. A session
made here does none of that: no environment, no redirects, and an optional
`Deadline` that cuts every socket of the exchange when it expires.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
import time

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool


class RedirectRefused(requests.exceptions.RequestException):
    """The server answered 3xx: following it would send our tokens to another place."""


class DeadlineExceeded(requests.exceptions.Timeout):
    """The exchange's deadline expired; its sockets were shut down."""


class Deadline:
    """One time limit for several requests, enforced on their sockets.

    Each connection's socket is duplicated when it is made; when time is up, a
    timer shuts the duplicates down, which ends any read in progress, however
    slowly the server trickles. The duplicates are our own descriptors, so the
    timer never touches a descriptor number that was closed and reused.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _cut(sock)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.expired:
                self._sockets.append(sock.dup())
                return
        _cut(sock)

    def check(self) -> None:
        if self.expired or time.monotonic() >= self.ends:
            raise DeadlineExceeded(f"the {self.seconds:g} s deadline expired")

    def clamp(self, timeout):
        """A requests timeout (None, seconds, or (connect, read)) no longer than the time left."""
        self.check()
        left = max(self.ends - time.monotonic(), 0.001)
        if timeout is None:
            return left
        if isinstance(timeout, tuple):
            return tuple(left if part is None else min(part, left) for part in timeout)
        return min(timeout, left)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_active_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("active_deadline", default=None)


class _TrackedConnection:
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        deadline = _active_deadline.get()
        if deadline is not None:
            deadline.track(sock)
        return sock


class _HTTPConnection(_TrackedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_TrackedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _TrackingAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class OutboundSession(requests.Session):
    """A requests session that uses only what the caller passes: see the module docstring."""

    def __init__(self, *, verify: bool | str = True, deadline: Deadline | None = None):
        super().__init__()
        self.trust_env = False  # no *_PROXY, REQUESTS_CA_BUNDLE or ~/.netrc
        self.verify = verify
        self.deadline = deadline
        adapter = _TrackingAdapter()
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, method, url, *args, **kwargs):
        kwargs["allow_redirects"] = False
        if self.deadline is None:
            response = super().request(method, url, *args, **kwargs)
        else:
            kwargs["timeout"] = self.deadline.clamp(kwargs.get("timeout"))
            reset = _active_deadline.set(self.deadline)
            try:
                response = super().request(method, url, *args, **kwargs)
            except requests.exceptions.RequestException as exc:
                if self.deadline.expired:
                    raise DeadlineExceeded(f"the {self.deadline.seconds:g} s deadline expired") from exc
                raise
            finally:
                _active_deadline.reset(reset)
            self.deadline.check()  # a cut connection may look like a short but complete answer
        if 300 <= response.status_code < 400:
            response.close()
            raise RedirectRefused(f"{url} answered {response.status_code} (a redirect); redirects are not followed")
        return response
