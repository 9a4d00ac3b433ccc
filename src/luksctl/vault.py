"""The one Vault client, standard library only: the root commands, the API's open and
(for its transport) the worker fan-out use it.

What it will not do, on purpose:
- follow a redirect (a token must reach only the URL it was meant for);
- use anything from the environment: no proxy, VAULT_TOKEN, ~/.vault-token, ~/.netrc,
  and no SSL_CERT_FILE / SSL_CERT_DIR: it trusts the system bundle file or the CA
  bundle it is handed, nothing else;
- talk plain http:// unless its caller allows it explicitly (tests, demos);
- wait without a bound: the calls of one exchange share one deadline, and a timer
  shuts their sockets when it fires, however slowly the server trickles;
- put a token or a secret value into an exception, a log line or a repr.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .errors import (
    SecretExists,
    SecretNotFound,
    UsageError,
    VaultDenied,
    VaultError,
    VaultUnreachable,
    VaultWriteDenied,
    WrappingTokenInvalid,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
MAX_RESPONSE_BYTES = 1024 * 1024
# After the exchange's deadline struck, a revoke still gets this long; then the token expires with its TTL.
REVOKE_GRACE = 2.0
# OpenSSL's compiled-in bundle (Debian: a link to this file), never the SSL_CERT_FILE it would also honour.
SYSTEM_CA_FILES = (ssl.get_default_verify_paths().openssl_cafile, "/etc/ssl/certs/ca-certificates.crt")
_PATH_SEGMENT_SAFE = "-_.~@+=:,"


class PlainHttpRefused(UsageError):
    """An http:// URL without the caller's explicit allowance: the token would cross the network in clear."""

    http_status = 400


class ConnectionFailed(VaultUnreachable):
    """Refused, reset, silent, too slow or TLS not verified: the network, not Vault, failed."""


# --- transport: one request, bounded by a deadline --------------------------------------------


class DeadlineExceeded(TimeoutError):
    pass


class RedirectRefused(Exception):
    pass


class Deadline:
    """One time limit for the requests made under it, enforced on their sockets.

    Each connection's TCP socket is duplicated when it is made; when time is up, a
    timer shuts the duplicates down, which ends any read in progress (TLS included).
    The duplicates are our own descriptors, so the timer never touches a number that
    was closed and reused.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0), self._expire)
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

    def left(self) -> float:
        """Seconds left; raises DeadlineExceeded when there are none."""
        left = self.ends - time.monotonic()
        if self.expired or left <= 0:
            raise DeadlineExceeded(f"the {self.seconds:g} s deadline expired")
        return left


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Connection(http.client.HTTPConnection):
    """http.client reads no proxy, .netrc or redirect; this one also registers its socket with the deadline."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, timeout: float, deadline: Deadline, tls: ssl.SSLContext | None,
                 check_peer: Callable[[bytes], None] | None = None):
        super().__init__(host, port, timeout=connect_timeout)
        self._read_timeout = timeout
        self._deadline = deadline
        self._tls = tls
        self._check_peer = check_peer

    def connect(self) -> None:
        super().connect()  # TCP only
        self._deadline.track(self.sock)  # before the handshake: a stalled handshake is cut too
        if self._tls is not None:  # the handshake runs under the connect timeout, as part of connecting
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host)
            if self._check_peer is not None:  # after the handshake, before a byte of the request
                self._check_peer(self.sock.getpeercert(binary_form=True))
        self.sock.settimeout(min(self._read_timeout, self._deadline.left()))


def tls_context(ca_bundle: str | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """TLS 1.2 or later, host name checked, trusting `ca_bundle` or the system bundle file only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    cafile = ca_bundle or next((path for path in SYSTEM_CA_FILES if os.path.isfile(path)), None)
    if cafile is None:
        raise VaultError(f"no system CA bundle at {' or '.join(SYSTEM_CA_FILES)}; name a CA bundle")
    try:
        context.load_verify_locations(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise VaultError(f"the CA bundle {cafile} cannot be loaded: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None
    return context


def request(
    method: str,
    url: str,
    *,
    deadline: Deadline,
    timeout: float,
    tls: ssl.SSLContext | None,
    headers: dict[str, str],
    body: bytes | None = None,
    connect_timeout: float | None = None,
    check_peer: Callable[[bytes], None] | None = None,
) -> tuple[int, bytes]:
    """(status, body of at most MAX_RESPONSE_BYTES + 1 bytes). `timeout` bounds each socket
    operation (`connect_timeout`, if given, the connect), `deadline` all of them together.
    `check_peer` gets the server's DER certificate before the request is sent, and may raise
    (luksctl-client's pinning). Raises OSError (TimeoutError, DeadlineExceeded, ssl errors),
    HTTPException or RedirectRefused, or what `check_peer` raises."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    connect_timeout = min(connect_timeout or timeout, deadline.left())
    connection = _Connection(parts.hostname, port, connect_timeout=connect_timeout, timeout=timeout, deadline=deadline, tls=tls, check_peer=check_peer)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers)
        answer = connection.getresponse()
        declared = answer.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) <= MAX_RESPONSE_BYTES:
            raw = answer.read()  # checks the declared length: a cut-off answer is not taken for a short one
        else:
            raw = answer.read(MAX_RESPONSE_BYTES + 1)
    except (OSError, http.client.HTTPException):
        deadline.left()  # a cut socket fails in many ways: say it was the deadline
        raise
    finally:
        connection.close()
    deadline.left()  # a cut connection may look like a short but complete answer
    if 300 <= answer.status < 400:
        raise RedirectRefused(f"{url} answered {answer.status}")
    return answer.status, raw


# --- what is stored where ------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretRef:
    """Where a passphrase lives: `<mount>/<path>`, key `<key>`, on a KV v1 or v2 mount."""

    mount: str
    path: str
    key: str
    kv_version: int = 2

    def __post_init__(self):
        for name in ("mount", "path"):
            value = getattr(self, name)
            parts = value.strip("/").split("/")
            if not value or any(part in ("", ".", "..") for part in parts) or any(c.isspace() or ord(c) < 32 for c in value):
                raise ValueError(f"the secret {name} {value!r} must be non-empty '/'-separated names without '..' or spaces")
        if not self.key:
            raise ValueError("the secret key must be non-empty")
        if self.kv_version not in (1, 2):
            raise ValueError("kv_version must be 1 or 2")

    def _quoted(self, value: str) -> str:
        return "/".join(urllib.parse.quote(part, safe=_PATH_SEGMENT_SAFE) for part in value.strip("/").split("/"))

    @property
    def data_path(self) -> str:
        """The API path of the secret's data (what policies name)."""
        middle = "/data/" if self.kv_version == 2 else "/"
        return f"{self._quoted(self.mount)}{middle}{self._quoted(self.path)}"

    @property
    def metadata_path(self) -> str:
        return f"{self._quoted(self.mount)}/metadata/{self._quoted(self.path)}"

    @property
    def where(self) -> str:
        return f"{self.mount.strip('/')}/{self.path.strip('/')}"

    def __str__(self) -> str:
        return f"{self.where} (key {self.key!r}, KV v{self.kv_version})"


@dataclass(frozen=True)
class StoredSecret:
    value: str = field(repr=False)
    version: int | None  # None on KV v1, which keeps no versions


# --- the client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Response:
    status: int
    body: dict | None  # None: not a JSON object

    @property
    def errors(self) -> str:
        """Vault's own error strings: they name paths and reasons, never a token."""
        errors = (self.body or {}).get("errors")
        return "; ".join(str(e) for e in errors) if isinstance(errors, list) else ""

    def get(self, *keys: str):
        value = self.body
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value


class VaultClient:
    """One Vault server, one token, one deadline shared by all its calls.

    `deadline` bounds the time spent in Vault calls, all of them together (the caller's
    own work between calls, e.g. rotate's cryptsetup, does not count); `timeout` bounds
    each socket operation. Build it, then `unwrap()` a wrapping token or pass `token=`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        ca_bundle: str | None = None,
        verify: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        deadline: float | None = None,
        allow_http: bool = False,
        on_request: Callable[[str, float], None] | None = None,
    ):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.username or parsed.query or parsed.fragment:
            raise VaultError(f"the Vault URL {url!r} must look like https://vault.example:8200")
        if parsed.scheme == "http" and not allow_http:
            raise PlainHttpRefused(f"the Vault URL {url} is plain http://: a token would cross the network unencrypted; use https://")
        deadline = timeout if deadline is None else deadline
        if not (0 < timeout <= 600 and 0 < deadline <= 600):
            raise VaultError("the Vault timeout must be between 0 and 600 seconds")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.deadline = deadline
        self._spent = 0.0
        self._tls = tls_context(ca_bundle, verify=verify) if parsed.scheme == "https" else None
        self._token = token
        self._who = "the token"
        self._on_request = on_request  # (step, seconds) after each request: the API's latency metric

    def __repr__(self) -> str:
        return f"VaultClient({self.url!r}, token={'set' if self._token else 'none'})"

    # --- the calls ---------------------------------------------------------------------------

    def wrapping_lookup(self, wrapping_token: str) -> str | None:
        """The path a wrapping token was created at. Sends it in the body: as X-Vault-Token it would spend its one use."""
        response = self._call("POST", "sys/wrapping/lookup", body={"token": wrapping_token}, token="", step="wrapping lookup", ok_statuses=(200, 400, 403, 404))
        if response.status != 200:
            raise WrappingTokenInvalid(
                "the wrapping token is expired or was already used (if not by you, it may have been intercepted); "
                "request a new one from the dashboard",
                possible_interception=True,
            )
        creation_path = response.get("data", "creation_path")
        return creation_path if isinstance(creation_path, str) else None

    def unwrap(self, wrapping_token: str) -> "VaultClient":
        """Unwrap a single-use wrapping token; the client then holds the token inside."""
        response = self._call("POST", "sys/wrapping/unwrap", token=wrapping_token, step="unwrap", ok_statuses=(200, 400, 401, 403, 404))
        if response.status != 200:
            raise WrappingTokenInvalid("the wrapping token is invalid, expired or already used; request a new one from the dashboard")
        client_token = response.get("auth", "client_token")
        if not isinstance(client_token, str) or not client_token:
            raise WrappingTokenInvalid("the wrapping token does not wrap a Vault token (expected auth.client_token)")
        self._token, self._who = client_token, "the unwrapped token"
        return self

    def kv_version(self, mount: str) -> int:
        """The mount's KV version; any token may ask about a mount it can use."""
        quoted = urllib.parse.quote(mount.strip("/"), safe="/" + _PATH_SEGMENT_SAFE)
        response = self._call("GET", f"sys/internal/ui/mounts/{quoted}", step="mount lookup", ok_statuses=(200, 400, 403, 404))
        if response.status != 200:
            return 2  # the dashboard's layout
        # `secrets enable kv` makes a v1 mount with no version option at all.
        return 2 if response.get("data", "options", "version") == "2" else 1

    def capabilities(self, ref: SecretRef) -> set[str]:
        """What our token may do on the secret's data path (the default policy allows asking)."""
        response = self._call("POST", "sys/capabilities-self", body={"paths": [ref.data_path]}, step="capabilities lookup")
        found = response.get(ref.data_path) or response.get("capabilities") or []
        return {str(c) for c in found} if isinstance(found, list) else set()

    def read(self, ref: SecretRef) -> StoredSecret:
        response = self._call("GET", ref.data_path, step="read secret", ok_statuses=(200, 401, 403, 404))
        if response.status == 404:
            raise SecretNotFound(f"no secret at {ref.where} (KV v{ref.kv_version}) at {self.url}")
        if response.status in (401, 403):
            raise VaultDenied(f"{self._who} may not read {ref.where}; check its Vault policy")
        data = response.get("data", "data") if ref.kv_version == 2 else response.get("data")
        version = response.get("data", "metadata", "version") if ref.kv_version == 2 else None
        value = data.get(ref.key) if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise SecretNotFound(f"the secret {ref.where} has no non-empty key {ref.key!r}")
        return StoredSecret(value, version if isinstance(version, int) else None)

    def holds(self, ref: SecretRef, value: str) -> bool:
        """Whether the secret at `ref` is exactly `value` (compared in constant time)."""
        return hmac.compare_digest(self.read(ref).value.encode(), value.encode())

    def write(self, ref: SecretRef, value: str, *, cas: int | None) -> int | None:
        """Store `value` at `ref`; returns the new KV v2 version (None on KV v1).

        cas=0 creates only; cas=N replaces version N only. With cas=0, a path that
        already holds a secret raises SecretExists. A create-only token gets 403 for
        an existing path, as for a path it may not write: VaultWriteDenied says both.
        """
        if ref.kv_version == 2:
            body: dict = {"data": {ref.key: value}}
            if cas is not None:
                body["options"] = {"cas": cas}
        else:
            body = {ref.key: value}
        response = self._call("POST", ref.data_path, body=body, step="write secret", ok_statuses=(200, 204, 400, 403))
        if response.status == 403:
            raise VaultWriteDenied(
                f"Vault refused to write {ref}: the token may not write this path"
                + (", or (with a create-only policy) the path already holds a secret" if cas == 0 or ref.kv_version == 1 else "")
            )
        if response.status == 400:
            if "check-and-set" in response.errors:
                raise SecretExists(f"{ref} already holds a secret (version is not {cas}); it was not overwritten")
            raise VaultError(f"Vault refused the write to {ref}: {response.errors or 'bad request'}")
        if ref.kv_version == 1:
            return None
        version = response.get("data", "version")
        if not isinstance(version, int):
            raise VaultError(f"Vault accepted the write to {ref} but did not report its version")
        return version

    def delete_metadata(self, ref: SecretRef) -> None:
        """Delete every version and the metadata (KV v2), or the secret (KV v1)."""
        path = ref.metadata_path if ref.kv_version == 2 else ref.data_path
        response = self._call("DELETE", path, step="delete secret", ok_statuses=(200, 204, 403))
        if response.status == 403:
            raise VaultDenied(f"the token may not delete {ref}")

    def create_wrapped_token(self, policy: str, wrap_ttl: str) -> str:
        """`token create -policy=<policy> -wrap-ttl=<wrap_ttl>` with our token: the single-use
        wrapping token an open posts, made as the dashboard makes it (luksctl-client open)."""
        response = self._call("POST", "auth/token/create", body={"policies": [policy]}, headers={"X-Vault-Wrap-TTL": wrap_ttl}, step="token create")
        token = response.get("wrap_info", "token")
        if not isinstance(token, str) or not token:
            raise VaultError(f"Vault at {self.url} created no wrapping token (no wrap_info.token in its answer)")
        return token

    def revoke_self(self) -> None:
        """Best effort: a failure is logged, and the token still dies with its TTL. Gets at least REVOKE_GRACE."""
        if not self._token:
            return
        try:
            self._call("POST", "auth/token/revoke-self", step="revoke", grace=REVOKE_GRACE)
        except VaultError as exc:
            log.warning("could not revoke our Vault token: %s", exc.message)
        finally:
            self._token = None

    # --- one call --------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        api_path: str,
        *,
        step: str,
        body: dict | None = None,
        token: str | None = None,
        ok_statuses: tuple[int, ...] = (200, 204),
        grace: float = 0.0,
        headers: dict[str, str] | None = None,
    ) -> _Response:
        token = self._token if token is None else token
        if token is None:
            raise VaultError(f"no Vault token for the {step}")
        headers = {"X-Vault-Request": "true", **(headers or {})}
        if token:
            headers["X-Vault-Token"] = token
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        left = max(self.deadline - self._spent, grace)
        if left <= 0:
            raise self._failed(step, DeadlineExceeded())
        log.debug("Vault at %s: %s /v1/%s (%s), %.1f s left", self.url, method, api_path, step, left)
        started = time.monotonic()
        try:
            with Deadline(left) as deadline:
                status, raw = request(method, f"{self.url}/v1/{api_path}", deadline=deadline, timeout=self.timeout, tls=self._tls, headers=headers, body=data)
        except RedirectRefused:
            log.warning("Vault at %s answered the %s with a redirect; not followed", self.url, step)
            raise VaultError(f"Vault at {self.url} answered with a redirect; redirects are not followed") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut off mid-answer, TLS
            raise self._failed(step, exc) from None
        finally:
            elapsed = time.monotonic() - started
            self._spent += elapsed
            if self._on_request is not None:
                self._on_request(step, elapsed)
        if len(raw) > MAX_RESPONSE_BYTES:
            raise VaultError(f"Vault at {self.url} sent more than {MAX_RESPONSE_BYTES} bytes ({step})")
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except ValueError:
            parsed = None
        response = _Response(status, parsed if isinstance(parsed, dict) else None)
        if status == 503:
            raise VaultUnreachable(f"Vault at {self.url} is sealed or not initialised ({step})")
        if status in (500, 502, 504):
            log.warning("Vault at %s failed during %s: HTTP %s %s", self.url, step, status, response.errors)
            raise VaultUnreachable(f"Vault at {self.url} failed during {step}")
        if status == 429:
            raise VaultUnreachable(f"Vault at {self.url} is rate limiting us ({step}); try again later")
        if status not in ok_statuses and status in (401, 403):
            raise VaultDenied(f"Vault at {self.url} refused the {step}: permission denied")
        if status not in ok_statuses:
            raise VaultError(f"Vault at {self.url} answered the {step} with HTTP {status}: {response.errors or 'no detail'}")
        if status == 200 and response.body is None:
            log.warning("Vault at %s answered the %s with no JSON object", self.url, step)
            raise VaultError(f"Vault at {self.url} gave an answer that is not Vault's JSON ({step})")
        return response

    def _failed(self, step: str, reason: BaseException) -> ConnectionFailed:
        log.warning("Vault at %s: %s failed: %s: %s", self.url, step, reason.__class__.__name__, reason)
        if isinstance(reason, ssl.SSLCertVerificationError):
            return ConnectionFailed(f"the TLS certificate of {self.url} could not be verified ({step}); name its CA bundle")
        if isinstance(reason, DeadlineExceeded):
            return ConnectionFailed(f"Vault at {self.url} did not answer within {self.deadline:g} s ({step})")
        if isinstance(reason, TimeoutError):
            return ConnectionFailed(f"Vault at {self.url} did not answer within {self.timeout:g} s ({step})")
        detail = getattr(reason, "strerror", None) or reason.__class__.__name__
        return ConnectionFailed(f"Vault at {self.url} cannot be reached ({step}): {detail}")


# --- the API's exchange --------------------------------------------------------------------------


@dataclass(frozen=True)
class VaultSettings:
    verify: bool | str = True  # True, False, or a CA bundle path
    timeout: float = DEFAULT_TIMEOUT  # per socket operation (connect, and each read)
    creation_paths: tuple[str, ...] = ("auth/token/create",)  # () skips the wrapping lookup
    deadline: float = 30  # the whole exchange; the revoke gets at least REVOKE_GRACE
    allow_http: bool = False
    on_request: Callable[[str, float], None] | None = None  # VaultClient's


def fetch_passphrase(url: str, ref: SecretRef, wrapping_token: str, settings: VaultSettings) -> str:
    """Lookup -> unwrap -> read KV (v2 or v1, from the mount's own description) -> revoke,
    so the unwrapped token is useless even if it leaked. `ref.kv_version` is not used."""
    try:
        client = VaultClient(
            url,
            ca_bundle=settings.verify if isinstance(settings.verify, str) else None,
            verify=settings.verify is not False,
            timeout=settings.timeout,
            deadline=settings.deadline,
            allow_http=settings.allow_http,
            on_request=settings.on_request,
        )
        if settings.creation_paths:
            _check_creation_path(client.wrapping_lookup(wrapping_token), settings.creation_paths)
        client.unwrap(wrapping_token)
        try:
            return client.read(replace(ref, kv_version=client.kv_version(ref.mount))).value
        finally:
            client.revoke_self()
    except ConnectionFailed:
        # The caller learns "unreachable", nothing more: refused, timeout and TLS details
        # would let anyone map the network through us. The log has them (_failed).
        raise VaultUnreachable(f"Vault at {url} is unreachable or too slow; the service log has the details") from None


def _check_creation_path(creation_path: str | None, allowed: tuple[str, ...]) -> None:
    """Vault's response-wrapping advice: a token made elsewhere (e.g. sys/wrapping/wrap) wraps anything."""
    if creation_path not in allowed:
        raise WrappingTokenInvalid(f"the wrapping token was created at {creation_path!r}, not at {' or '.join(allowed)}; it was not unwrapped")
