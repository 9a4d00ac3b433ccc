"""rotate and decommission against a real OpenBao and real LUKS headers in image files.

Policies with and without read, update and delete, each giving its refusal; the
rotation's order checked by cutting it at its Vault write and at its luksKillSlot,
then running it again.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from luks_lab import LUKS_LAB_FAST_NEW_SLOT as FAST_NEW_SLOT
from luks_lab import LUKS_LAB_PASSPHRASE
from support.policies import DELETE_ONLY, READ_POLICY, WRITE_ONLY

from luksctl import vault
from luksctl.errors import EXIT_OK, EXIT_REFUSED, VaultUnreachable
from luksctl.root import cryptsetup
from luksctl.root.journal import VAULT_WRITTEN, Journal
from luksctl.root.setup import VaultTarget, store_in_vault
from luksctl.vault import SecretRef

from .conftest import CREATE_READ, KV1_ROOT, KV2_ROOT, ROTATE, SECRET_KEY, UPDATE_ONLY, token_file, vault_args, vault_value

OLD = LUKS_LAB_PASSPHRASE.decode()
EXIT_VAULT_DENIED = 4  # VaultDenied keeps the generic "command failed" code


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rotate_stores_a_new_version_that_alone_opens_and_rewrites_the_backup(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(OLD)
    lab.run(capsys, "header", "backup")

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))

    assert code == EXIT_OK, answer
    new, version = vault_value(bao, secret_path)
    assert version == 2 and answer["vault_version"] == 2
    assert len(new) == 64 and new != OLD
    assert lab.opens(lab.image, new.encode()) and not lab.opens(lab.image, OLD.encode())
    assert lab.opens(lab.backup, new.encode()) and not lab.opens(lab.backup, OLD.encode())
    assert answer["removed_slot"] == 0 and answer["new_slot"] == 1
    assert not (lab.dir / "rotate-pending.json").exists()
    assert lab.run(capsys, "header", "verify")[0] == EXIT_OK


def test_rotate_with_a_wrapping_token_revokes_what_it_unwrapped(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(OLD)
    inner = f"lifecycle-test-{tmp_path.name}"
    wrapped = token_file(bao, tmp_path, ROTATE, wrapped=True, client_token=inner)

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, wrapped, wrapped=True))

    assert code == EXIT_OK, answer
    assert lab.opens(lab.image, vault_value(bao, secret_path)[0].encode())
    assert not bao.token_alive(inner)


def test_rotate_on_kv1_overwrites(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(OLD, root=KV1_ROOT, kv_version=1)

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT,
                           *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE), root=KV1_ROOT, kv_version=1))

    assert code == EXIT_OK, answer
    new, _ = vault_value(bao, secret_path, KV1_ROOT, 1)
    assert new != OLD and lab.opens(lab.image, new.encode()) and not lab.opens(lab.image, OLD.encode())


@pytest.mark.parametrize(("policy", "has"), [(READ_POLICY, "read"), (WRITE_ONLY, "create"), (UPDATE_ONLY, "update"),
                                            (CREATE_READ, "create, read")])
def test_rotate_without_read_and_update_is_refused_and_changes_nothing(lab, policies, tmp_path, capsys, policy, has):
    bao = policies
    secret_path = bao.store_secret(OLD)
    before = digest(lab.image)

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, policy)))

    assert code == EXIT_VAULT_DENIED
    assert answer["error"] == (f"rotation needs read and update on {KV2_ROOT}/{secret_path} (key 'storage_encryption_key', KV v2); "
                               f"this token has {has} there (the dashboard's tokens are create-only or read-only); nothing was changed")
    assert digest(lab.image) == before and vault_value(bao, secret_path) == (OLD, 1)
    assert not (lab.dir / "rotate-pending.json").exists()


def test_rotate_refuses_when_vaults_secret_does_not_open_the_volume(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret("not this volume's passphrase")
    before = digest(lab.image)

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))

    assert code == EXIT_REFUSED and "does not open" in answer["error"]
    assert digest(lab.image) == before


def test_rotate_cut_at_the_vault_write_resumes_with_the_same_new_passphrase(lab, policies, tmp_path, capsys, monkeypatch):
    bao = policies
    secret_path = bao.store_secret(OLD)

    def vault_fails(*args, **kwargs):
        raise VaultUnreachable("Vault at the test URL cannot be reached (write secret): injected")

    with monkeypatch.context() as patch:
        patch.setattr(vault.VaultClient, "write", vault_fails)
        code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))
    assert code != EXIT_OK
    pending = json.loads((lab.dir / "rotate-pending.json").read_text())["passphrase"].encode()
    assert vault_value(bao, secret_path) == (OLD, 1)
    assert lab.opens(lab.image, OLD.encode()) and lab.opens(lab.image, pending), "both open while Vault holds the old one"
    _, report = lab.run(capsys, "report")
    assert report["pending"] and report["pending"][0].startswith("rotate")

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))

    assert code == EXIT_OK and answer["resumed"] is True
    assert vault_value(bao, secret_path) == (pending.decode(), 2)
    assert lab.opens(lab.image, pending) and not lab.opens(lab.image, OLD.encode())
    assert not (lab.dir / "rotate-pending.json").exists()


def test_rotate_cut_before_the_old_slot_is_killed_resumes_from_vault(lab, policies, tmp_path, capsys, monkeypatch):
    bao = policies
    secret_path = bao.store_secret(OLD)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the SIGKILL the VM test sends at this very step

    with monkeypatch.context() as patch:
        patch.setattr("luksctl.root.rotate.kill_slot", killed)
        with pytest.raises(KeyboardInterrupt):
            lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))
    new, version = vault_value(bao, secret_path)
    assert version == 2 and lab.opens(lab.image, new.encode()) and lab.opens(lab.image, OLD.encode())

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))

    assert code == EXIT_OK and answer["resumed"] is True and answer["steps"] == ["removed old keyslot", "wrote header backup"]
    assert vault_value(bao, secret_path) == (new, 2), "a resumed rotation does not write Vault twice"
    assert not lab.opens(lab.image, OLD.encode()) and lab.opens(lab.image, new.encode())


def test_rotate_keeps_the_recovery_key(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(OLD)
    _, added = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=OLD.encode())

    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, token_file(bao, tmp_path, ROTATE)))

    assert code == EXIT_OK
    assert lab.opens(lab.image, added["recovery_key"].encode())
    assert cryptsetup.opening_slot(str(lab.image), added["recovery_key"].encode()) == added["recovery_slot"]


def test_decommission_erases_deletes_the_secret_and_every_file(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(OLD)
    lab.run(capsys, "header", "backup")
    backup_copy = lab.backup.read_bytes()

    code, answer = lab.run(capsys, "decommission", "--yes", *vault_args(bao, secret_path, token_file(bao, tmp_path, DELETE_ONLY)))

    assert code == EXIT_OK, answer
    assert answer["volume_state"] == "unavailable"
    assert bao.request("GET", f"{KV2_ROOT}/metadata/{secret_path}", ok=(404,)).status_code == 404
    assert not lab.opens(lab.image, OLD.encode())
    assert not lab.backup.exists() and not lab.ini.exists() and not (lab.dir / "luks-header.bck.sha256").exists()
    assert backup_copy  # the backup existed, and opened with the old passphrase, until decommission


def test_decommission_without_delete_is_refused_and_erases_nothing(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(OLD)
    lab.run(capsys, "header", "backup")

    code, answer = lab.run(capsys, "decommission", "--yes", *vault_args(bao, secret_path, token_file(bao, tmp_path, READ_POLICY)))

    assert code == EXIT_VAULT_DENIED
    assert answer["error"] == f"the token may not delete {KV2_ROOT}/{secret_path} (key 'storage_encryption_key', KV v2)"
    assert lab.opens(lab.image, OLD.encode()) and lab.backup.exists() and lab.ini.exists()
    assert vault_value(bao, secret_path) == (OLD, 1)


def test_decommission_without_yes_on_a_pipe_refuses_before_vault(lab, policies, tmp_path, capsys):
    bao = policies
    secret_path = bao.store_secret(OLD)

    code, answer = lab.run(capsys, "decommission", *vault_args(bao, secret_path, token_file(bao, tmp_path, DELETE_ONLY)))

    assert code == EXIT_REFUSED and "--yes" in answer["error"]
    assert lab.opens(lab.image, OLD.encode()) and vault_value(bao, secret_path) == (OLD, 1)


def test_a_plain_token_is_still_valid_after_setup_rotate_and_decommission(lab, policies, tmp_path, capsys):
    """A plain --token-file token is the operator's own, maybe the parent of others: only a token we unwrapped is revoked."""
    bao = policies
    plain = {policy: token_file(bao, tmp_path, policy) for policy in (WRITE_ONLY, ROTATE, DELETE_ONLY)}

    def token(policy: str) -> str:
        return (tmp_path / f"token-{policy}-plain").read_text().strip()

    record = Journal(tmp_path / "setup-state")
    record.begin(b"new volume passphrase", {})
    target = VaultTarget(bao.url, SecretRef(KV2_ROOT, "plain/deploy-1/storage_encryption", SECRET_KEY, 2), wrapped=False, token=token(WRITE_ONLY),
                         allow_http=True)
    store_in_vault(target, b"new volume passphrase", record)
    assert record.done(VAULT_WRITTEN) and bao.token_alive(token(WRITE_ONLY))

    secret_path = bao.store_secret(OLD)
    code, answer = lab.run(capsys, "rotate", *FAST_NEW_SLOT, *vault_args(bao, secret_path, plain[ROTATE]))
    assert code == EXIT_OK, answer
    assert bao.token_alive(token(ROTATE))

    code, answer = lab.run(capsys, "decommission", "--yes", *vault_args(bao, secret_path, plain[DELETE_ONLY]))
    assert code == EXIT_OK, answer
    assert bao.token_alive(token(DELETE_ONLY))
