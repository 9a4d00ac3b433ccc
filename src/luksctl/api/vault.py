"""Fetch the volume passphrase from Vault with a single-use wrapping token.

Unwrap -> read KV (v2 or v1, from the mount's own description) -> revoke the
unwrapped token, so it is useless even if it leaked. Every hvac or network
error becomes one of our errors with a message that names the Vault path and
never a token.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import hvac
import hvac.exceptions
import requests

from ..errors import SecretNotFound, VaultDenied, VaultError, VaultUnreachable, WrappingTokenInvalid
from . import outbound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecretLocation:
    vault_url: str
    secret_root: str
    secret_path: str
    secret_key: str

    def __str__(self) -> str:
        return f"{self.secret_root}/{self.secret_path} (key {self.secret_key!r}) at {self.vault_url}"


@dataclass(frozen=True)
class VaultSettings:
    verify: bool | str = True  # True, False, or a CA bundle path
    timeout: float = 10  # per request (connect, and each read)
    creation_paths: tuple[str, ...] = ("auth/token/create",)  # () skips the wrapping lookup
    deadline: float = 30  # the whole exchange, revoke included


# After the exchange's deadline struck, a revoke still gets this long; then the token expires with its TTL.
REVOKE_GRACE = 2.0


def _client(location: SecretLocation, settings: VaultSettings, deadline: outbound.Deadline, token: str) -> hvac.Client:
    """A client that sends `token` ("" for none) and nothing from the environment
    (VAULT_TOKEN, ~/.vault-token, VAULT_CLIENT_CERT, proxies, .netrc), and follows no redirect."""
    session = outbound.OutboundSession(verify=settings.verify, deadline=deadline)
    return hvac.Client(
        url=location.vault_url,
        token=token,
        cert=False,
        verify=settings.verify,
        timeout=settings.timeout,
        allow_redirects=False,
        session=session,
    )


@contextlib.contextmanager
def _translated_errors(location: SecretLocation, settings: VaultSettings, step: str) -> Iterator[None]:
    try:
        yield
    except outbound.RedirectRefused:
        log.warning("Vault at %s answered %s with a redirect; not followed", location.vault_url, step)
        raise VaultError(f"Vault at {location.vault_url} answered with a redirect; redirects are not followed") from None
    except requests.exceptions.RequestException as exc:
        # The caller learns "unreachable", nothing more: refused, timeout and TLS details
        # would let anyone map the network through us. The log keeps them.
        log.warning("Vault at %s unreachable during %s: %s: %s", location.vault_url, step, exc.__class__.__name__, exc)
        raise VaultUnreachable(
            f"Vault at {location.vault_url} is unreachable or too slow; the service log has the details"
        ) from None
    except (hvac.exceptions.VaultDown, hvac.exceptions.VaultNotInitialized):
        raise VaultUnreachable(f"Vault at {location.vault_url} is sealed or not initialised ({step})") from None
    except (hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway, hvac.exceptions.UnexpectedError) as exc:
        log.warning("Vault error during %s: %s %s", step, exc.__class__.__name__, getattr(exc, "errors", None))
        raise VaultUnreachable(f"Vault at {location.vault_url} failed during {step}") from None
    except hvac.exceptions.RateLimitExceeded:
        raise VaultUnreachable(f"Vault at {location.vault_url} is rate limiting us ({step}); try again later") from None


def _json_object(response, location: SecretLocation, step: str) -> dict:
    """hvac hands back a dict for a JSON 200 and the raw response otherwise (HTML, text, a list)."""
    if isinstance(response, dict):
        return response
    log.warning("Vault at %s answered %s with no JSON object (HTTP %s)", location.vault_url, step, getattr(response, "status_code", "?"))
    raise VaultError(f"Vault at {location.vault_url} gave an answer that is not Vault's JSON ({step})")


def fetch_passphrase(location: SecretLocation, wrapping_token: str, settings: VaultSettings) -> str:
    with outbound.Deadline(settings.deadline) as deadline:
        # No token for the lookup: sent as X-Vault-Token it would spend the wrapping token's one use.
        client = _client(location, settings, deadline, token="")
        if settings.creation_paths:
            _check_wrapping_token(client, location, settings, wrapping_token)
        client.token = wrapping_token
        client.token = _unwrap(client, location, settings)
        try:
            return _read_secret(client, location, settings)
        finally:
            _revoke(client, location, settings, deadline)


def _check_wrapping_token(client: hvac.Client, location: SecretLocation, settings: VaultSettings, wrapping_token: str) -> None:
    """Vault's response-wrapping advice: look the token up before unwrapping it.

    A token that no longer exists was either used by someone else or expired;
    the first may mean it was intercepted, so it is flagged for the audit log.
    """
    try:
        with _translated_errors(location, settings, "wrapping lookup"):
            response = _json_object(client.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrapping_token}), location, "wrapping lookup")
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden, hvac.exceptions.InvalidPath):
        raise WrappingTokenInvalid(
            "the wrapping token is expired or was already used (if not by you, it may have been intercepted); "
            "request a new one from the dashboard",
            possible_interception=True,
        ) from None
    creation_path = (response.get("data") or {}).get("creation_path")
    if creation_path not in settings.creation_paths:
        raise WrappingTokenInvalid(
            f"the wrapping token was created at {creation_path!r}, not at {' or '.join(settings.creation_paths)}; "
            "it was not unwrapped"
        )


def _unwrap(client: hvac.Client, location: SecretLocation, settings: VaultSettings) -> str:
    try:
        with _translated_errors(location, settings, "unwrap"):
            response = _json_object(client.sys.unwrap(), location, "unwrap")
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized, hvac.exceptions.InvalidPath):
        raise WrappingTokenInvalid(
            "the wrapping token is invalid, expired or already used; request a new one from the dashboard"
        ) from None
    token = (response.get("auth") or {}).get("client_token")
    if not isinstance(token, str) or not token:
        raise WrappingTokenInvalid("the wrapping token does not wrap a Vault token (expected auth.client_token)")
    return token


def _kv_version(client: hvac.Client, location: SecretLocation, settings: VaultSettings) -> str:
    """The mount's KV version; any token may ask about a mount it can use."""
    try:
        with _translated_errors(location, settings, "mount lookup"):
            mount = client.adapter.get(f"/v1/sys/internal/ui/mounts/{location.secret_root}")
    except hvac.exceptions.VaultError:
        return "2"  # the dashboard's layout
    options = (_json_object(mount, location, "mount lookup").get("data") or {}).get("options") or {}
    # `secrets enable kv` makes a v1 mount with no version option at all.
    return "2" if options.get("version") == "2" else "1"


def _read_secret(client: hvac.Client, location: SecretLocation, settings: VaultSettings) -> str:
    version = _kv_version(client, location, settings)
    try:
        with _translated_errors(location, settings, "read secret"):
            if version == "2":
                response = client.secrets.kv.v2.read_secret_version(
                    path=location.secret_path, mount_point=location.secret_root, raise_on_deleted_version=True
                )
                data = (_json_object(response, location, "read secret").get("data") or {}).get("data") or {}
            else:
                response = client.secrets.kv.v1.read_secret(path=location.secret_path, mount_point=location.secret_root)
                data = _json_object(response, location, "read secret").get("data") or {}
    except hvac.exceptions.InvalidPath:
        raise SecretNotFound(f"no secret at {location.secret_root}/{location.secret_path} (KV v{version}) at {location.vault_url}") from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
        raise VaultDenied(f"the unwrapped token may not read {location.secret_root}/{location.secret_path}; check its Vault policy") from None
    except hvac.exceptions.VaultError as exc:
        log.warning("Vault refused the read: %s %s", exc.__class__.__name__, getattr(exc, "errors", None))
        raise VaultError(f"Vault refused to read {location.secret_root}/{location.secret_path}") from None
    value = data.get(location.secret_key)
    if not isinstance(value, str) or not value:
        raise SecretNotFound(f"the secret {location.secret_root}/{location.secret_path} has no non-empty key {location.secret_key!r}")
    return value


def _revoke(client: hvac.Client, location: SecretLocation, settings: VaultSettings, deadline: outbound.Deadline) -> None:
    """Best effort: a failed revoke is logged, and the token still expires with its TTL.

    If the exchange's deadline has struck, the revoke gets REVOKE_GRACE seconds of its own.
    """
    if not deadline.expired:
        _try_revoke(client, location, settings)
        return
    with outbound.Deadline(REVOKE_GRACE) as grace:
        _try_revoke(_client(location, settings, grace, client.token), location, settings)


def _try_revoke(client: hvac.Client, location: SecretLocation, settings: VaultSettings) -> None:
    try:
        with _translated_errors(location, settings, "revoke"):
            client.auth.token.revoke_self()
    except VaultError as exc:
        log.warning("could not revoke the unwrapped token: %s", exc.message)
    except hvac.exceptions.VaultError as exc:
        log.warning("could not revoke the unwrapped token: %s", exc.__class__.__name__)
