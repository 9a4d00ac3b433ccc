"""vault.fetch_passphrase against a real OpenBao (PROTOCOL §3, steps 1 and 2)."""

from __future__ import annotations

import time
import uuid

import pytest
from support.waiting import wait_until

from luksctl import vault
from luksctl.errors import SecretNotFound, VaultUnreachable, WrappingTokenInvalid

from .conftest import KV1_PLAIN_ROOT, KV1_ROOT, KV2_ROOT, SECRET_KEY

SETTINGS = vault.VaultSettings(timeout=5, allow_http=True)  # OpenBao listens on http://127.0.0.1


def location(url: str, secret_path: str, *, root: str = KV2_ROOT, key: str = SECRET_KEY) -> tuple[str, vault.SecretRef]:
    return url, vault.SecretRef(root, secret_path, key)


def passphrase() -> str:
    return f"pass-{uuid.uuid4().hex}"


def test_unwraps_and_reads_kv_v2(bao):
    secret = passphrase()
    path = bao.store_secret(secret)
    wrapped = bao.wrap_token()

    assert vault.fetch_passphrase(*location(bao.url, path), wrapped.token, SETTINGS) == secret


def test_reads_kv_v1_mount_with_version_option(bao):
    secret = passphrase()
    path = bao.store_secret(secret, root=KV1_ROOT, kv_version=1)

    assert vault.fetch_passphrase(*location(bao.url, path, root=KV1_ROOT), bao.wrap_token().token, SETTINGS) == secret


def test_reads_kv_v1_mount_without_version_option(bao):
    """`bao secrets enable kv` (and `vault secrets enable kv`) make a KV v1 mount whose options are {}."""
    secret = passphrase()
    path = bao.store_secret(secret, root=KV1_PLAIN_ROOT, kv_version=1)

    assert vault.fetch_passphrase(*location(bao.url, path, root=KV1_PLAIN_ROOT), bao.wrap_token().token, SETTINGS) == secret


def test_wrapping_token_works_only_once(bao):
    secret = passphrase()
    path = bao.store_secret(secret)
    wrapped = bao.wrap_token()
    assert vault.fetch_passphrase(*location(bao.url, path), wrapped.token, SETTINGS) == secret

    with pytest.raises(WrappingTokenInvalid) as caught:
        vault.fetch_passphrase(*location(bao.url, path), wrapped.token, SETTINGS)
    assert caught.value.possible_interception


def test_wrapping_token_from_another_creation_path_is_not_unwrapped(bao):
    """sys/wrapping/wrap makes a valid wrapping token around any data: it must not be unwrapped."""
    response = bao.request("POST", "sys/wrapping/wrap", headers={"X-Vault-Wrap-TTL": "60s"}, json={"anything": "x"})
    token = response.json()["wrap_info"]["token"]

    settings = vault.VaultSettings(timeout=5, allow_http=True, creation_paths=("auth/token/create", "auth/approle/login"))
    with pytest.raises(WrappingTokenInvalid) as refused:
        vault.fetch_passphrase(*location(bao.url, bao.store_secret(passphrase())), token, settings)
    assert refused.value.message == ("the wrapping token was created at 'sys/wrapping/wrap', not at auth/token/create or "
                                     "auth/approle/login; it was not unwrapped")
    assert bao.lookup_wrapping(token)


def test_expired_wrapping_token_is_invalid(bao):
    path = bao.store_secret(passphrase())
    wrapped = bao.wrap_token("1s")
    wait_until(lambda: not bao.lookup_wrapping(wrapped.token), 15, "the 1 s wrapping token to expire", interval=0.05)

    with pytest.raises(WrappingTokenInvalid):
        vault.fetch_passphrase(*location(bao.url, path), wrapped.token, SETTINGS)


def test_wrong_path_is_secret_not_found(bao):
    bao.store_secret(passphrase())
    missing = f"sub-nobody/{uuid.uuid4()}/storage_encryption"

    with pytest.raises(SecretNotFound) as caught:
        vault.fetch_passphrase(*location(bao.url, missing), bao.wrap_token().token, SETTINGS)
    assert missing in caught.value.message


def test_wrong_key_is_secret_not_found(bao):
    path = bao.store_secret(passphrase())

    with pytest.raises(SecretNotFound) as caught:
        vault.fetch_passphrase(*location(bao.url, path, key="no_such_key"), bao.wrap_token().token, SETTINGS)
    assert "no_such_key" in caught.value.message


def test_wrong_key_in_kv_v1_is_secret_not_found(bao):
    path = bao.store_secret(passphrase(), root=KV1_ROOT, kv_version=1)

    with pytest.raises(SecretNotFound):
        vault.fetch_passphrase(*location(bao.url, path, root=KV1_ROOT, key="no_such_key"), bao.wrap_token().token, SETTINGS)


def test_unwrapped_token_is_revoked_after_success(bao):
    path = bao.store_secret(passphrase())
    wrapped = bao.wrap_token()
    assert bao.accessor_alive(wrapped.wrapped_accessor)

    vault.fetch_passphrase(*location(bao.url, path), wrapped.token, SETTINGS)

    assert not bao.accessor_alive(wrapped.wrapped_accessor)


@pytest.mark.parametrize("failure", ["missing secret", "missing key"])
def test_unwrapped_token_is_revoked_after_a_failed_read(bao, failure):
    path = bao.store_secret(passphrase())
    where = location(bao.url, "sub-x/none/storage_encryption") if failure == "missing secret" else location(bao.url, path, key="nope")
    wrapped = bao.wrap_token()
    assert bao.accessor_alive(wrapped.wrapped_accessor)

    with pytest.raises(SecretNotFound):
        vault.fetch_passphrase(*where, wrapped.token, SETTINGS)

    assert not bao.accessor_alive(wrapped.wrapped_accessor)


def test_vault_down_is_unreachable_fast(closed_port_url):
    settings = vault.VaultSettings(timeout=3, allow_http=True)
    started = time.monotonic()

    with pytest.raises(VaultUnreachable) as caught:
        vault.fetch_passphrase(*location(closed_port_url, "a/b/storage_encryption"), "s.sometoken", settings)

    assert time.monotonic() - started < settings.timeout + 2
    assert closed_port_url in caught.value.message


def test_silent_server_is_unreachable_after_the_timeout(silent_server_url):
    settings = vault.VaultSettings(timeout=1, allow_http=True)
    started = time.monotonic()

    with pytest.raises(VaultUnreachable) as caught:
        vault.fetch_passphrase(*location(silent_server_url, "a/b/storage_encryption"), "s.sometoken", settings)

    elapsed = time.monotonic() - started
    assert settings.timeout * 0.9 <= elapsed < settings.timeout + 3
    assert "unreachable or too slow" in caught.value.message


def test_tls_verification_is_on_by_default():
    assert vault.VaultSettings().verify is True


def test_self_signed_certificate_is_refused_by_default(self_signed_server):
    started = time.monotonic()

    with pytest.raises(VaultUnreachable) as caught:
        vault.fetch_passphrase(*location(self_signed_server.url, "a/b/storage_encryption"), "s.sometoken", vault.VaultSettings(timeout=5))

    assert time.monotonic() - started < 5
    assert "unreachable" in caught.value.message


def test_self_signed_certificate_is_accepted_with_its_ca_bundle(self_signed_server):
    """Control for the test above: with the CA bundle the handshake works and the server's `{}` is read."""
    settings = vault.VaultSettings(verify=self_signed_server.ca_bundle, timeout=5)

    with pytest.raises(WrappingTokenInvalid):  # the server's `{}` is no wrapping token
        vault.fetch_passphrase(*location(self_signed_server.url, "a/b/storage_encryption"), "s.sometoken", settings)


def test_https_to_a_plain_http_vault_fails_fast(bao):
    https_url = bao.url.replace("http://", "https://")
    settings = vault.VaultSettings(timeout=5)
    started = time.monotonic()

    with pytest.raises(VaultUnreachable):
        vault.fetch_passphrase(*location(https_url, bao.store_secret(passphrase())), bao.wrap_token().token, settings)

    assert time.monotonic() - started < settings.timeout


def test_a_failed_revoke_is_logged_and_the_token_forgotten(local_server, caplog):
    """Best effort: the token dies with its TTL anyway; the log says the revoke failed and why."""
    server = local_server(lambda seen, body: (500, {}, b""))
    client = vault.VaultClient(server.url, token="hvs.to-revoke", timeout=5, allow_http=True)

    with caplog.at_level("WARNING", logger="luksctl.vault"):
        client.revoke_self()

    assert caplog.messages[-1] == f"could not revoke our Vault token: Vault at {server.url} failed during revoke"
    assert repr(client).endswith("token=none)")
    assert "hvs.to-revoke" not in caplog.text


@pytest.mark.parametrize("status", [400, 403, 404])
def test_a_wrapping_token_vault_cannot_look_up_is_refused_before_unwrap(local_server, status):
    server = local_server(lambda seen, body: (status, {}, b'{"errors": ["bad token"]}'))

    with pytest.raises(WrappingTokenInvalid) as refused:
        vault.fetch_passphrase(*location(server.url, "a/b/storage_encryption"), "hvs.used", SETTINGS)

    assert refused.value.message == ("the wrapping token is expired or was already used (if not by you, it may have been "
                                     "intercepted); request a new one from the dashboard")
    assert refused.value.possible_interception and [seen.path for seen in server.seen] == ["/v1/sys/wrapping/lookup"]


def test_a_creation_path_that_is_not_a_string_is_none(local_server):
    server = local_server(lambda seen, body: (200, {}, b'{"data": {"creation_path": 123}}'))

    with pytest.raises(WrappingTokenInvalid) as refused:
        vault.fetch_passphrase(*location(server.url, "a/b/storage_encryption"), "hvs.odd", SETTINGS)

    assert refused.value.message == "the wrapping token was created at None, not at auth/token/create; it was not unwrapped"


def test_a_connection_failure_is_logged_with_its_step_and_cause(closed_port_url, caplog):
    """The caller hears only "unreachable"; the service log has what failed where."""
    with caplog.at_level("WARNING", logger="luksctl.vault"), pytest.raises(VaultUnreachable):
        vault.fetch_passphrase(*location(closed_port_url, "a/b/storage_encryption"), "hvs.some-token", SETTINGS)

    assert caplog.messages == [f"Vault at {closed_port_url}: wrapping lookup failed: ConnectionRefusedError: [Errno 111] Connection refused"]
