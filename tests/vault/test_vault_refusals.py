"""README's 403 and 502 rows against a real OpenBao: a token whose policy is for another path,
and a sealed Vault. The front-end app runs with a fake privileged bridge (conftest)."""

from __future__ import annotations

from .conftest import assert_error, open_body, post_open

OTHER_PATH_POLICY = "luksctl-other-path-only"


def test_unwrapped_token_that_may_read_only_another_path_is_403(bao, frontend_app, fake_bridge):
    bao.put_policy(OTHER_PATH_POLICY, 'path "secrets/data/somebody-else/*" { capabilities = ["read"] }')
    path = bao.store_secret("not readable with this token")
    wrapped = bao.wrap_token(policies=(OTHER_PATH_POLICY,))

    body = assert_error(post_open(frontend_app, open_body(bao.url, wrapped.token, path)), 403)

    assert body["error"] == f"the unwrapped token may not read secrets/{path}; check its Vault policy"
    assert fake_bridge.passphrases == []
    assert not bao.lookup_wrapping(wrapped.token), "the token was unwrapped: the read was refused, not the token"
    assert not bao.accessor_alive(wrapped.wrapped_accessor), "the unwrapped token must be revoked after a refused read"


def test_sealed_vault_is_502(own_bao, frontend_app, fake_bridge):
    path = own_bao.store_secret("sealed away")
    wrapped = own_bao.wrap_token()
    own_bao.request("PUT", "sys/seal")
    assert own_bao.request("GET", "sys/seal-status").json()["sealed"] is True

    body = assert_error(post_open(frontend_app, open_body(own_bao.url, wrapped.token, path)), 502)

    assert body["error"].startswith(f"Vault at {own_bao.url} is sealed"), body
    assert fake_bridge.passphrases == []
