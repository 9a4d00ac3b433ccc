"""`luksctl reencrypt` and `rotate --reencrypt` with a real OpenBao, on real LUKS2 image files."""

from __future__ import annotations

import io
import json
import subprocess

from luks_lab import LUKS_LAB_FAST_NEW_SLOT as FAST_NEW_SLOT
from luks_lab import LUKS_LAB_PASSPHRASE
from support.policies import READ_POLICY

from luksctl.errors import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_WRONG_PASSPHRASE
from luksctl.root import cryptsetup
from luksctl.root.cli import main

from .conftest import ROTATE, token_file, vault_args, vault_value

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


# --- rotate --reencrypt ---------------------------------------------------------------------------


def volume_key(image, passphrase: bytes, target):
    subprocess.run(["cryptsetup", "luksDump", "--dump-volume-key", "--volume-key-file", str(target), "--batch-mode", "--key-file=-", str(image)],
                   input=passphrase, check=True, capture_output=True)
    return target


def volume_key_fits(image, key) -> bool:
    result = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--volume-key-file", str(key), str(image)], capture_output=True)
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


def rotate_reencrypt(lab, capsys, bao, secret_path, tmp_path, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["--json", "rotate", "--reencrypt", *FAST_NEW_SLOT, *argv, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE))],
                paths=lab.paths, stdin=io.BytesIO(b""), stdin_is_tty=False)
    return code, json.loads(capsys.readouterr().out.splitlines()[-1])


def test_rotate_reencrypt_leaves_nothing_from_before_that_opens(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(STORED)
    lab.run(capsys, "header", "backup")
    old_backup = tmp_path / "old-header-backup"
    old_backup.write_bytes(lab.backup.read_bytes())
    old_key = volume_key(lab.image, LUKS_LAB_PASSPHRASE, tmp_path / "old-key")

    code, answer = rotate_reencrypt(lab, capsys, bao, secret_path, tmp_path)

    assert code == EXIT_OK, answer
    new, version = vault_value(bao, secret_path)
    assert version == 2 and answer["vault_version"] == 2 and answer["reencryption"]["reencrypted"] is True
    assert lab.opens(lab.image, new.encode()) and not lab.opens(lab.image, LUKS_LAB_PASSPHRASE), "not the old passphrase"
    assert not volume_key_fits(lab.image, old_key), "not the old volume key"
    from_old_backup = volume_key(old_backup, LUKS_LAB_PASSPHRASE, tmp_path / "key-from-the-old-backup")
    assert not volume_key_fits(lab.image, from_old_backup), "not the old header backup"
    assert lab.opens(lab.backup, new.encode()) and lab.run(capsys, "header", "verify")[0] == EXIT_OK


def test_rotate_reencrypt_refuses_before_rotating_what_the_reencryption_would_refuse(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(STORED)
    assert lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=LUKS_LAB_PASSPHRASE)[0] == EXIT_OK

    code, answer = rotate_reencrypt(lab, capsys, bao, secret_path, tmp_path)

    assert code == EXIT_REFUSED and "--recovery-key-file" in answer["error"]
    assert vault_value(bao, secret_path) == (STORED, 1) and lab.opens(lab.image, LUKS_LAB_PASSPHRASE)


def test_rotate_reencrypt_rerun_after_the_rotation_resumes_only_the_reencryption(lab, policies, tmp_path, capsys):
    """Killed once the new passphrase was in place and the re-encryption had started: no second new passphrase."""
    bao = policies
    secret_path = bao.store_secret(STORED)
    code, rotated = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))
    assert code == EXIT_OK, rotated
    new, _ = vault_value(bao, secret_path)
    subprocess.run(["cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", "--batch-mode", "--key-file=-", *FAST_NEW_SLOT,
                    str(lab.image)], input=new.encode(), check=True, capture_output=True)

    code, answer = rotate_reencrypt(lab, capsys, bao, secret_path, tmp_path)

    assert code == EXIT_OK, answer
    assert "new_slot" not in answer and answer["reencryption"]["steps"][0] == "resumed the re-encryption"
    assert vault_value(bao, secret_path) == (new, 2) and not cryptsetup.read_header(str(lab.image)).reencrypting


def test_plain_rotate_during_an_unfinished_reencryption_is_refused_and_changes_nothing(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(STORED)
    subprocess.run(["cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", "--batch-mode", "--key-file=-", *FAST_NEW_SLOT,
                    str(lab.image)], input=LUKS_LAB_PASSPHRASE, check=True, capture_output=True)
    slots = cryptsetup.read_header(str(lab.image)).keyslots

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))

    assert code == EXIT_REFUSED and "luksctl reencrypt" in answer["error"], answer
    assert vault_value(bao, secret_path) == (STORED, 1) and lab.opens(lab.image, LUKS_LAB_PASSPHRASE)
    header = cryptsetup.read_header(str(lab.image))
    assert header.reencrypting and header.keyslots == slots


def test_recovery_key_options_without_reencrypt_are_a_usage_error(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(STORED)

    code, answer = lab.run(capsys, "rotate", "--drop-other-keyslots", *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))

    assert code == EXIT_USAGE and vault_value(bao, secret_path) == (STORED, 1)
