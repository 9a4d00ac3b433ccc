"""POST /luksctl_api/v1.0/open against a real OpenBao, with a fake privileged bridge (PROTOCOL §3)."""

from __future__ import annotations

import uuid

import pytest
from support.waiting import wait_until

from .conftest import KV1_ROOT, assert_error, open_body, post_open


def test_open_hands_the_stored_passphrase_to_the_bridge(bao, frontend_app, fake_bridge):
    secret = f"correct horse {uuid.uuid4().hex}"
    path = bao.store_secret(secret)
    wrapped = bao.wrap_token()

    response = post_open(frontend_app, open_body(bao.url, wrapped.token, path))

    assert response.status_code == 200
    assert response.get_json() == {"volume_state": "mounted"}
    assert fake_bridge.passphrases == [secret]
    assert not bao.accessor_alive(wrapped.wrapped_accessor), "the unwrapped token must be revoked"


def test_open_reads_kv_v1(bao, frontend_app, fake_bridge):
    secret = f"v1-{uuid.uuid4().hex}"
    path = bao.store_secret(secret, root=KV1_ROOT, kv_version=1)

    response = post_open(frontend_app, open_body(bao.url, bao.wrap_token().token, path, root=KV1_ROOT))

    assert response.status_code == 200
    assert fake_bridge.passphrases == [secret]


def test_open_when_mounted_leaves_the_wrapping_token_unused(bao, frontend_app, fake_bridge):
    fake_bridge.kernel.mounted = True
    wrapped = bao.wrap_token()

    response = post_open(frontend_app, open_body(bao.url, wrapped.token, bao.store_secret("unused")))

    assert response.status_code == 200
    assert response.get_json() == {"volume_state": "mounted"}
    assert fake_bridge.passphrases == []
    assert bao.lookup_wrapping(wrapped.token)


def test_used_wrapping_token_is_403(bao, frontend_app, fake_bridge):
    path = bao.store_secret("first-use-wins")
    wrapped = bao.wrap_token()
    bao.unwrap(wrapped.token)  # someone else used it first

    assert_error(post_open(frontend_app, open_body(bao.url, wrapped.token, path)), 403)
    assert fake_bridge.passphrases == []


def test_expired_wrapping_token_is_403(bao, frontend_app, fake_bridge):
    path = bao.store_secret("too-late")
    wrapped = bao.wrap_token("1s")
    wait_until(lambda: not bao.lookup_wrapping(wrapped.token), 15, "the 1 s wrapping token to expire", interval=0.05)

    assert_error(post_open(frontend_app, open_body(bao.url, wrapped.token, path)), 403)
    assert fake_bridge.passphrases == []


def test_missing_secret_is_404(bao, frontend_app, fake_bridge):
    missing = f"sub-nobody/{uuid.uuid4()}/storage_encryption"

    body = assert_error(post_open(frontend_app, open_body(bao.url, bao.wrap_token().token, missing)), 404)
    assert missing in body["error"]
    assert fake_bridge.passphrases == []


def test_missing_key_is_404(bao, frontend_app, fake_bridge):
    path = bao.store_secret("has-another-key")

    body = assert_error(post_open(frontend_app, open_body(bao.url, bao.wrap_token().token, path, key="wrong_key")), 404)
    assert "wrong_key" in body["error"]
    assert fake_bridge.passphrases == []


@pytest.mark.parametrize("server", ["closed_port_url", "silent_server_url", "self_signed_server"])
def test_an_unreachable_vault_is_502_saying_only_unreachable(frontend_app, fake_bridge, server, request, caplog):
    """Refused, silent past VAULT_TIMEOUT (3 s here) or failing TLS: the caller learns the same
    thing, so the answers cannot map a network. The service log says which."""
    url = request.getfixturevalue(server)
    url = getattr(url, "url", url)

    body = assert_error(post_open(frontend_app, open_body(url, "s.abcdef", "a/b/storage_encryption")), 502)

    assert body["error"] == f"Vault at {url} is unreachable or too slow; the service log has the details"
    assert {"closed_port_url": "ConnectionRefusedError", "silent_server_url": "TimeoutError", "self_signed_server": "SSLCertVerificationError"}[server] in caplog.text


@pytest.mark.parametrize("missing", ["vault_url", "vault_token", "secret_root", "secret_path", "secret_key"])
def test_missing_field_is_400_without_contacting_vault(bao, frontend_app, fake_bridge, missing):
    wrapped = bao.wrap_token()
    body = open_body(bao.url, wrapped.token, "a/b/storage_encryption")
    del body[missing]

    error = assert_error(post_open(frontend_app, body), 400)
    assert missing in error["error"]
    assert bao.lookup_wrapping(wrapped.token)
