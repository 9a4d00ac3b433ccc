"""luksctl-client open against a real OpenBao and the front end as deployed (support.serving:
nginx and gunicorn, with the fake bridge): the user's own token, found where the vault CLI finds
it, may only create the wrapping token; the front end unwraps it, reads the secret, mounts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.policies import READ_POLICY
from support.serving import running_stack

CLIENT = Path(sys.executable).parent / "luksctl-client"
PASSPHRASE = "client passphrase 7f3a"
CREATE_TOKEN = "luksctl-test-create-token"  # the user's: token create, and nothing else of its own


@pytest.fixture(scope="module")
def stack(bao):
    with running_stack("luksctl-client-vault.", fake_volume=True, config={"VAULT_URL_ALLOWLIST": [bao.url], "ALLOW_PLAIN_HTTP": True}) as stack:
        yield stack


def user_token(bao, policies: list[str]) -> str:
    """A user's token. Vault lets a token give a child only policies it holds itself, so the
    user who may create the open's wrapping token holds the read policy too."""
    bao.put_policy(CREATE_TOKEN, 'path "auth/token/create" { capabilities = ["create", "update"] }')
    return bao.request("POST", "auth/token/create", json={"policies": policies, "no_default_policy": True, "ttl": "10m"}).json()["auth"]["client_token"]


def open_as_user(bao, stack, home: Path, token: str, secret_path: str) -> subprocess.CompletedProcess:
    """The vault CLI's conventions: VAULT_ADDR, the token in ~/.vault-token (after `vault login`)."""
    home.mkdir(exist_ok=True)
    (home / ".vault-token").write_text(token)
    return subprocess.run([str(CLIENT), "--ca", str(stack.cert), "open", f"127.0.0.1:{stack.port}", "--secret-path", secret_path],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home), "VAULT_ADDR": bao.url})


def status(stack, home: Path) -> str:
    done = subprocess.run([str(CLIENT), "--ca", str(stack.cert), "status", f"127.0.0.1:{stack.port}"], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
    return done.stdout.splitlines()[1].split()[1]


def test_a_token_that_may_not_create_tokens_is_refused_by_vault_and_nothing_is_posted(bao, stack, tmp_path):
    secret_path = bao.store_secret(PASSPHRASE)
    token = user_token(bao, [READ_POLICY])

    done = open_as_user(bao, stack, tmp_path / "home", token, secret_path)

    assert done.returncode == 1
    assert f"Vault at {bao.url} refused the token create: permission denied" in done.stderr
    assert "to open and mount" not in done.stderr
    assert status(stack, tmp_path / "home") == "unmounted"


def test_open_makes_a_wrapping_token_from_the_users_token_and_the_volume_is_mounted(bao, stack, tmp_path):
    secret_path = bao.store_secret(PASSPHRASE)
    token = user_token(bao, [CREATE_TOKEN, READ_POLICY])
    assert status(stack, tmp_path / "home") == "unmounted"

    done = open_as_user(bao, stack, tmp_path / "home", token, secret_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"127.0.0.1:{stack.port}  volume_state mounted\n"
    assert "single-use wrapping token" in done.stderr and f"asking 127.0.0.1:{stack.port} to open and mount its volume" in done.stderr
    assert status(stack, tmp_path / "home") == "mounted"
    for secret in (PASSPHRASE, token):
        assert secret not in done.stdout + done.stderr + stack.gunicorn_log.read_text()


def test_without_a_vault_token_open_says_how_to_get_one(bao, stack, tmp_path):
    done = subprocess.run([str(CLIENT), "--ca", str(stack.cert), "open", f"127.0.0.1:{stack.port}", "--secret-path", "a/b/c"],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VAULT_ADDR": bao.url})

    assert done.returncode == 2
    assert "no Vault token: log in with `vault login` (or `bao login`), or set VAULT_TOKEN" in done.stderr
