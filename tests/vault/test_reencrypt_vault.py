"""`luksctl reencrypt` reading the passphrase from a real OpenBao, on a real LUKS2 image file."""

from __future__ import annotations

import io
import json

from luks_lab import LUKS_LAB_FAST_NEW_SLOT as FAST_NEW_SLOT
from luks_lab import LUKS_LAB_PASSPHRASE
from support.policies import READ_POLICY

from luksctl.errors import EXIT_OK, EXIT_USAGE, EXIT_WRONG_PASSPHRASE
from luksctl.root import cryptsetup
from luksctl.root.cli import main

from .conftest import token_file, vault_args, vault_value

STORED = LUKS_LAB_PASSPHRASE.decode()


def reencrypt(lab, capsys, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["--json", "reencrypt", *FAST_NEW_SLOT, *argv], paths=lab.paths, stdin=io.BytesIO(b""), stdin_is_tty=False)
    return code, json.loads(capsys.readouterr().out.splitlines()[-1])


def test_reencrypt_with_the_dashboards_read_token_revokes_what_it_unwrapped(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(STORED)
    inner = f"reencrypt-test-{tmp_path.name}"
    wrapped = token_file(bao, tmp_path, READ_POLICY, wrapped=True, client_token=inner)
    digest = cryptsetup.read_header(str(lab.image)).volume_key_digest

    code, answer = reencrypt(lab, capsys, *vault_args(bao, secret_path, wrapped, wrapped=True))

    assert code == EXIT_OK, answer
    assert cryptsetup.read_header(str(lab.image)).volume_key_digest != digest
    assert lab.opens(lab.image, LUKS_LAB_PASSPHRASE) and vault_value(bao, secret_path) == (STORED, 1), "the passphrase stays"
    assert not bao.token_alive(inner)


def test_reencrypt_refuses_a_secret_in_vault_that_does_not_open_the_volume(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret("another volume's passphrase")
    digest = cryptsetup.read_header(str(lab.image)).volume_key_digest

    code, answer = reencrypt(lab, capsys, *vault_args(bao, secret_path, token_file(bao, tmp_path, READ_POLICY)))

    assert code == EXIT_WRONG_PASSPHRASE, answer
    assert cryptsetup.read_header(str(lab.image)).volume_key_digest == digest


def test_reencrypt_with_a_vault_url_but_no_token_is_a_usage_error(lab, capsys):
    code, answer = reencrypt(lab, capsys, "--vault-url", "https://vault.example:8200", "--secret-path", "a/b/storage_encryption")

    assert code == EXIT_USAGE and "--wrapping-token-file or --token-file" in answer["error"]
