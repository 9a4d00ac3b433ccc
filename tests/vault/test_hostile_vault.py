"""A Vault URL that misbehaves, and an environment that offers credentials: what we send and
how fast we give up (issue 10, items 1, 2, 4 and 9)."""

from __future__ import annotations

import dataclasses
import fcntl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.waiting import wait_until

from luksctl import vault
from luksctl.errors import VaultUnreachable

from .conftest import OPEN_URL, ROOT_TOKEN, in_thread, json_answer, open_body

NETRC_PASSWORD = "netrc-password-must-not-be-sent"


def post_open(app, body: dict):
    return app.test_client().post(OPEN_URL, json=body)


def frontend(app):
    return app.extensions["luksctl_frontend"]


def settings(**changes) -> vault.VaultSettings:
    return dataclasses.replace(vault.VaultSettings(timeout=2, deadline=3, allow_http=True), **changes)


def location(url: str, secret_path: str = "a/b/storage_encryption") -> tuple[str, vault.SecretRef]:
    return url, vault.SecretRef("secrets", secret_path, "storage_encryption_key")


# --- 1. Only our tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("ambient", ["VAULT_TOKEN", "valid ~/.vault-token", "unreadable ~/.vault-token"])
def test_only_the_wrapping_and_the_unwrapped_token_reach_vault(bao, vault_front, local_server, frontend_app, fake_bridge, tmp_path, monkeypatch, ambient):
    """The service's environment offers Vault's root token, a .netrc password for the Vault
    host and a proxy: none of it may be used. (As root, a file mode cannot make ~/.vault-token
    unreadable; a directory there fails to read the same way, as PermissionError did.)"""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine 127.0.0.1 login vault password {NETRC_PASSWORD}\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    if ambient == "VAULT_TOKEN":
        monkeypatch.setenv("VAULT_TOKEN", ROOT_TOKEN)
    elif ambient == "valid ~/.vault-token":
        (home / ".vault-token").write_text(ROOT_TOKEN)
    else:
        (home / ".vault-token").mkdir()
    proxy = local_server(lambda seen, body: json_answer({}))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    secret = f"only-our-tokens-{uuid.uuid4().hex}"
    unwrapped = f"unwrapped-{uuid.uuid4().hex}"
    wrapped = bao.wrap_token(token_id=unwrapped)

    response = post_open(frontend_app, open_body(vault_front.url, wrapped.token, bao.store_secret(secret)))

    assert response.status_code == 200, response.get_json()
    assert fake_bridge.passphrases == [secret]
    assert proxy.seen == [], "a proxy from the environment was used"
    sent = {(seen.path.split("?")[0], seen.headers.get("x-vault-token")) for seen in vault_front.seen}
    assert sent == {
        ("/v1/sys/wrapping/lookup", None),  # the token is in the body: as a header it would spend its one use
        ("/v1/sys/wrapping/unwrap", wrapped.token),
        ("/v1/sys/internal/ui/mounts/secrets", unwrapped),
        (next(s.path for s in vault_front.seen if s.path.startswith("/v1/secrets/data/")), unwrapped),
        ("/v1/auth/token/revoke-self", unwrapped),
    }
    assert not [seen for seen in vault_front.seen if {"authorization", "proxy-authorization"} & seen.headers.keys()]


# --- 2. No redirects ---------------------------------------------------------------------------


def test_a_redirect_from_vault_is_502_and_not_followed(frontend_app, fake_bridge, local_server):
    elsewhere = local_server(lambda seen, body: json_answer({"data": {"creation_path": "auth/token/create"}}))
    redirector = local_server(lambda seen, body: (307, {"Location": elsewhere.url + seen.path}, b""))

    response = post_open(frontend_app, open_body(redirector.url, "s.wrappingtoken", "a/b/storage_encryption"))

    assert response.status_code == 502, response.get_json()
    assert response.get_json()["error"] == f"Vault at {redirector.url} answered with a redirect; redirects are not followed"
    assert [seen.path for seen in redirector.seen] == ["/v1/sys/wrapping/lookup"]
    assert elsewhere.seen == [], "the redirect was followed, with the wrapping token"
    assert fake_bridge.passphrases == []


# --- 9. A 200 that is not JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("content_type, payload", [("text/html", b"<html>captive portal</html>"), ("application/json", b"[1, 2]")])
def test_a_200_from_vault_that_is_not_a_json_object_is_502(frontend_app, fake_bridge, local_server, content_type, payload):
    not_vault = local_server(lambda seen, body: (200, {"Content-Type": content_type}, payload))

    response = post_open(frontend_app, open_body(not_vault.url, "s.wrappingtoken", "a/b/storage_encryption"))

    assert response.status_code == 502, response.get_json()
    assert response.get_json()["error"] == f"Vault at {not_vault.url} gave an answer that is not Vault's JSON (wrapping lookup)"
    assert fake_bridge.passphrases == []


# --- 4. One deadline for the whole exchange ----------------------------------------------------


def test_a_vault_that_trickles_is_cut_at_the_deadline(local_server):
    """One byte every 0.2 s: each read is far inside VAULT_TIMEOUT, the whole answer is not."""
    trickler = local_server(lambda seen, body: json_answer({"data": {"creation_path": "auth/token/create", "padding": "x" * 200}}))
    trickler.trickle = lambda seen: 0.2

    error, elapsed = in_thread(lambda: vault.fetch_passphrase(*location(trickler.url), "s.wrapping", settings()), bound=15)

    assert isinstance(error, VaultUnreachable), error
    assert error.message == f"Vault at {trickler.url} is unreachable or too slow; the service log has the details"
    assert 3 <= elapsed < 3 + 1, elapsed


def test_the_deadline_covers_every_step_and_the_token_is_still_revoked(bao, vault_front):
    """Lookup, unwrap and mount lookup are quick; the read trickles past the deadline. The
    unwrapped token is then revoked within REVOKE_GRACE instead of living out its TTL."""
    path = bao.store_secret("never read")
    wrapped = bao.wrap_token()
    vault_front.trickle = lambda seen: 0.2 if seen.path.startswith("/v1/secrets/data/") else 0.0

    error, elapsed = in_thread(lambda: vault.fetch_passphrase(*location(vault_front.url, path), wrapped.token, settings()), bound=20)

    assert isinstance(error, VaultUnreachable), error
    assert 3 <= elapsed < 3 + vault.REVOKE_GRACE + 1, elapsed
    assert [seen.path for seen in vault_front.seen][-1] == "/v1/auth/token/revoke-self"
    assert not bao.accessor_alive(wrapped.wrapped_accessor)


def test_a_trickling_vault_releases_the_open_lock_at_the_deadline(bao, frontend_app, fake_bridge, local_server):
    """An open stuck on a trickling Vault answers 502 at VAULT_DEADLINE, and a real open that
    was waiting for the lock then succeeds."""
    frontend(frontend_app).vault_settings = dataclasses.replace(frontend(frontend_app).vault_settings, deadline=3)
    trickler = local_server(lambda seen, body: json_answer({"data": {"creation_path": "auth/token/create", "padding": "x" * 200}}))
    trickler.trickle = lambda seen: 0.2
    secret = f"real-{uuid.uuid4().hex}"
    real = open_body(bao.url, bao.wrap_token().token, bao.store_secret(secret))

    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        stuck = pool.submit(post_open, frontend_app, open_body(trickler.url, "s.wrapping", "a/b/storage_encryption"))
        wait_until(lambda: trickler.seen, 5, "the trickling Vault to be asked", interval=0.05)
        waiting = pool.submit(post_open, frontend_app, real)
        stuck_answer = stuck.result(timeout=15)
        stuck_elapsed = time.monotonic() - started
        real_answer = waiting.result(timeout=30)

    assert stuck_answer.status_code == 502, stuck_answer.get_json()
    assert "unreachable or too slow" in stuck_answer.get_json()["error"]
    assert stuck_elapsed < 3 + 2, stuck_elapsed
    assert real_answer.status_code == 200, real_answer.get_json()
    assert fake_bridge.passphrases == [secret]
    lock = Path(frontend(frontend_app).config.LOCK_FILE)
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone still holds it


def test_a_healthy_exchange_through_the_front_server_fits_the_deadline(bao, vault_front):
    """Control for the deadline tests: the front server itself is not what is slow."""
    secret = f"control-{uuid.uuid4().hex}"
    path = bao.store_secret(secret)

    assert vault.fetch_passphrase(*location(vault_front.url, path), bao.wrap_token().token, settings()) == secret
