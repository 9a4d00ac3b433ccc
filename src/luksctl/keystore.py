"""Vault for the root commands: standard library only (urllib + ssl).

The API keeps hvac (vault.py); the root side may import nothing but the
standard library, so `setup`, `rotate` and `decommission` talk to Vault here.

What this client will not do, on purpose:
- follow a redirect (a token must reach only the URL the operator named);
- use a proxy, VAULT_TOKEN, ~/.vault-token or ~/.netrc (nothing ambient: the
  token is the one handed in, and it travels to the named URL only);
- skip TLS verification (a CA bundle may be named instead);
- wait without a bound (every call has a timeout);
- put a token or a secret value into an exception, a log line or a repr.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from .errors import SecretExists, SecretNotFound, VaultDenied, VaultError, VaultUnreachable, VaultWriteDenied, WrappingTokenInvalid

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
MAX_RESPONSE_BYTES = 1024 * 1024
_PATH_SEGMENT_SAFE = "-_.~@+=:,"


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

    def __str__(self) -> str:
        return f"{self.mount}/{self.path} (key {self.key!r}, KV v{self.kv_version})"


@dataclass(frozen=True)
class StoredSecret:
    value: str = field(repr=False)
    version: int | None  # None on KV v1, which keeps no versions


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError, which we refuse


class _Response:
    def __init__(self, status: int, body: dict):
        self.status = status
        self.body = body

    @property
    def errors(self) -> str:
        """Vault's own error strings: they name paths and reasons, never a token."""
        errors = self.body.get("errors") if isinstance(self.body, dict) else None
        return "; ".join(str(e) for e in errors) if isinstance(errors, list) else ""


class Keystore:
    """One Vault server, one token. Build it with `Keystore.unwrap(...)` or `Keystore(url, token=...)`."""

    def __init__(self, url: str, *, token: str | None = None, ca_bundle: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.username or parsed.query or parsed.fragment:
            raise VaultError(f"the Vault URL {url!r} must look like https://vault.example:8200")
        if not 0 < timeout <= 600:
            raise VaultError("the Vault timeout must be between 0 and 600 seconds")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._token = token
        context = ssl.create_default_context(cafile=ca_bundle)  # verifies certificate and host name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),  # no proxy from the environment
            urllib.request.HTTPSHandler(context=context),
            _NoRedirects(),
        )

    def __repr__(self) -> str:
        return f"Keystore({self.url!r}, token={'set' if self._token else 'none'})"

    # --- the calls -------------------------------------------------------------------------

    @classmethod
    def unwrap(cls, url: str, wrapping_token: str, *, ca_bundle: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> "Keystore":
        """Unwrap a single-use wrapping token into a client that holds the token inside."""
        keystore = cls(url, ca_bundle=ca_bundle, timeout=timeout)
        response = keystore._call("POST", "sys/wrapping/unwrap", token=wrapping_token, step="unwrap", ok_statuses=(200, 400, 403))
        if response.status != 200:
            raise WrappingTokenInvalid("the wrapping token is invalid, expired or already used; request a new one")
        client_token = ((response.body.get("auth") or {}) if isinstance(response.body, dict) else {}).get("client_token")
        if not isinstance(client_token, str) or not client_token:
            raise WrappingTokenInvalid("the wrapping token does not wrap a Vault token (expected auth.client_token)")
        keystore._token = client_token
        return keystore

    def capabilities(self, ref: SecretRef) -> set[str]:
        """What our token may do on the secret's data path (the default policy allows asking)."""
        response = self._call("POST", "sys/capabilities-self", body={"paths": [ref.data_path]}, step="capabilities lookup")
        found = response.body.get(ref.data_path) or response.body.get("capabilities") or []
        return {str(c) for c in found} if isinstance(found, list) else set()

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
        version = ((response.body.get("data") or {}) if isinstance(response.body, dict) else {}).get("version")
        if not isinstance(version, int):
            raise VaultError(f"Vault accepted the write to {ref} but did not report its version")
        return version

    def read(self, ref: SecretRef) -> StoredSecret:
        response = self._call("GET", ref.data_path, step="read secret", ok_statuses=(200, 403, 404))
        if response.status == 404:
            raise SecretNotFound(f"no secret at {ref}")
        if response.status == 403:
            raise VaultDenied(f"the token may not read {ref}")
        data = response.body.get("data") or {}
        if ref.kv_version == 2:
            version = (data.get("metadata") or {}).get("version")
            data = data.get("data") or {}
        else:
            version = None
        value = data.get(ref.key)
        if not isinstance(value, str) or not value:
            raise SecretNotFound(f"the secret at {ref} has no non-empty key {ref.key!r}")
        return StoredSecret(value, version if isinstance(version, int) else None)

    def holds(self, ref: SecretRef, value: str) -> bool:
        """Whether the secret at `ref` is exactly `value` (compared in constant time)."""
        return hmac.compare_digest(self.read(ref).value.encode(), value.encode())

    def delete_metadata(self, ref: SecretRef) -> None:
        """Delete every version and the metadata (KV v2), or the secret (KV v1)."""
        path = ref.metadata_path if ref.kv_version == 2 else ref.data_path
        response = self._call("DELETE", path, step="delete secret", ok_statuses=(200, 204, 403))
        if response.status == 403:
            raise VaultDenied(f"the token may not delete {ref}")

    def revoke_self(self) -> None:
        """Best effort: a failure is logged, and the token still dies with its TTL."""
        try:
            self._call("POST", "auth/token/revoke-self", step="revoke")
        except VaultError as exc:
            log.warning("could not revoke our Vault token: %s", exc.message)
        finally:
            self._token = None

    # --- transport -------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        api_path: str,
        *,
        body: dict | None = None,
        step: str,
        token: str | None = None,
        ok_statuses: tuple[int, ...] = (200, 204),
    ) -> _Response:
        token = token if token is not None else self._token
        if not token:
            raise VaultError(f"no Vault token for the {step}")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/v1/{api_path}", data=data, method=method)
        request.add_header("X-Vault-Token", token)
        request.add_header("X-Vault-Request", "true")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                status, raw = answer.status, answer.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read(MAX_RESPONSE_BYTES + 1)
            exc.close()
        except urllib.error.URLError as exc:
            raise self._unreachable(step, exc.reason) from None
        except (TimeoutError, OSError) as exc:
            raise self._unreachable(step, exc) from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise VaultError(f"Vault at {self.url} sent more than {MAX_RESPONSE_BYTES} bytes ({step})")
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except ValueError:
            parsed = None
        response = _Response(status, parsed if isinstance(parsed, dict) else {})
        if 300 <= status < 400:
            raise VaultError(f"Vault at {self.url} answered the {step} with a redirect ({status}); redirects are not followed")
        if status in (500, 502, 503, 504):
            raise VaultUnreachable(f"Vault at {self.url} is unavailable, sealed or failing ({step}: HTTP {status})")
        if status == 429:
            raise VaultUnreachable(f"Vault at {self.url} is rate limiting us ({step}); try again later")
        if status == 401 or (status == 403 and 403 not in ok_statuses):
            raise VaultDenied(f"Vault at {self.url} refused the {step}: permission denied")
        if status not in ok_statuses:
            raise VaultError(f"Vault at {self.url} answered the {step} with HTTP {status}: {response.errors or 'no detail'}")
        if parsed is None:
            raise VaultError(f"Vault at {self.url} answered the {step} with a body that is not JSON")
        return response

    def _unreachable(self, step: str, reason: object) -> VaultUnreachable:
        if isinstance(reason, ssl.SSLCertVerificationError):
            return VaultUnreachable(f"the TLS certificate of {self.url} could not be verified ({step}); name its CA bundle")
        if isinstance(reason, TimeoutError):
            return VaultUnreachable(f"Vault at {self.url} did not answer within {self.timeout:g} s ({step})")
        name = reason.__class__.__name__ if isinstance(reason, BaseException) else "error"
        detail = getattr(reason, "strerror", None) or name
        return VaultUnreachable(f"Vault at {self.url} cannot be reached ({step}): {detail}")
