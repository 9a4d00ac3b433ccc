"""README's config keys that change how Vault is talked to, each set through the front end's
config against a real OpenBao (or a real TLS server): WRAPPING_CREATION_PATHS and
VAULT_TLS_VERIFY. Every test also shows the default, so the key is what makes the difference."""

from __future__ import annotations

import pytest

from .conftest import assert_error, open_body, post_open


def orphan_wrapping_token(bao) -> str:
    """A wrapping token around a readable token, but made at auth/token/create-orphan."""
    response = bao.request("POST", "auth/token/create-orphan", headers={"X-Vault-Wrap-TTL": "60s"},
                       json={"policies": ["luksctl-read"], "ttl": "1h"})
    wrap_info = response.json()["wrap_info"]
    assert wrap_info["creation_path"] == "auth/token/create-orphan"
    return wrap_info["token"]


def test_wrapping_creation_paths_empty_skips_the_creation_path_check(bao, make_frontend_app, fake_bridge):
    path = bao.store_secret("made elsewhere")
    refused = orphan_wrapping_token(bao)

    body = assert_error(post_open(make_frontend_app(), open_body(bao.url, refused, path)), 403)
    assert "auth/token/create-orphan" in body["error"], body
    assert bao.lookup_wrapping(refused)

    accepted = orphan_wrapping_token(bao)
    response = post_open(make_frontend_app(WRAPPING_CREATION_PATHS=[]), open_body(bao.url, accepted, path))
    assert (response.status_code, response.get_json()) == (200, {"volume_state": "mounted"})
    assert fake_bridge.passphrases == ["made elsewhere"]


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # what the key asks for
def test_vault_tls_verify_false_accepts_a_self_signed_vault(make_frontend_app, fake_bridge, self_signed_server, caplog):
    body = open_body(self_signed_server.url, "s.sometoken", "a/b/storage_encryption")

    refused = assert_error(post_open(make_frontend_app(), body), 502)
    # The caller learns only "unreachable"; the operator's log says it was the certificate.
    assert "unreachable" in refused["error"]
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text

    # The handshake passes; the server's `{}` is then no wrapping token (403), not a TLS error.
    answered = assert_error(post_open(make_frontend_app(VAULT_TLS_VERIFY=False), body), 403)
    assert "unreachable" not in answered["error"]
    assert fake_bridge.passphrases == []
