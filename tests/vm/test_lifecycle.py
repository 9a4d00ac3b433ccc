"""The key lifecycle on a real kernel: rotate (mounted, and SIGKILLed at each step),
the recovery key, header backup verify/restore and decommission, each ending with what
the dashboard's flow can (or, after decommission, cannot) open.

Cheap by design: new keyslots use a fast PBKDF (`--pbkdf pbkdf2 --iter-time 1`), the
kill tests share one volume, and the OpenBao and API of the session are reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from helpers_vm import CRYPTSETUP, HEADER_BACKUP, MOUNTPOINT, VOLUME_INI, Volume, VolumeFactory, kernel_state, put_back_closed, run, wait_until
from leaks import watch_for_leaks
from support.policies import DELETE_ONLY
from support.proc import processes
from support.shim import SHIM_DIR, install_shim, remove_shim

LUKSCTL = "/usr/local/sbin/luksctl"
FAST_SLOT = ["--pbkdf", "pbkdf2", "--iter-time", "1"]
ROTATE_POLICY = "luksctl-rotate"
SUB = "lifecycle-user-sub"
PENDING = Path("/etc/luks/rotate-pending.json")  # the new passphrase and its slots, one file
CRYPTSETUP_WRAPPER = SHIM_DIR / "cryptsetup"  # first on luksctl's fixed PATH


def opens(volume: Volume, passphrase: str | bytes) -> bool:
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    return run(CRYPTSETUP, "open", "--test-passphrase", "--key-file=-", volume.loop, input=secret, check=False).returncode == 0


def stored(bao, secret_path: str) -> str:
    return bao.request("GET", f"secrets/data/{secret_path}").json()["data"]["data"]["storage_encryption_key"]


def stored_or_none(bao, secret_path: str) -> str | None:
    try:
        return stored(bao, secret_path)
    except requests.HTTPError:  # none yet, or OpenBao was restarted and forgot it
        return None


def token_file(bao, policy: str) -> str:
    """A plain token with `policy`, in a root-only file: luksctl never takes one in argv."""
    token = bao.request("POST", "auth/token/create", json={"policies": [policy], "ttl": "1h"}).json()["auth"]["client_token"]
    path = Path("/run") / f"lifecycle-token-{policy}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


def vault_args(bao, secret_path: str, policy: str) -> list[str]:
    return ["--vault-url", bao.url, "--vault-allow-http", "--secret-path", secret_path, "--token-file", token_file(bao, policy)]


def luksctl(*argv: str, stdin: bytes = b"") -> tuple[int, dict, str]:
    done = subprocess.run([LUKSCTL, "--json", *argv], input=stdin, capture_output=True, timeout=300)
    return done.returncode, json.loads(done.stdout), done.stderr.decode(errors="replace")


def rotate_args(bao, secret_path: str) -> list[str]:
    return ["rotate", *FAST_SLOT, *vault_args(bao, secret_path, ROTATE_POLICY)]


@pytest.fixture
def vault(bao_up):
    """The session's OpenBao with a rotation policy (again after a restart, which forgets
    everything) beside the dashboard's, delete_only among them (support.policies)."""
    bao_up.put_policy(ROTATE_POLICY, 'path "secrets/data/*" { capabilities = ["read", "update"] }')
    return bao_up


def test_rotate_a_mounted_volume_then_the_dashboard_opens_with_the_new_secret(luks_volume, vault, dashboard):
    old = "lifecycle old passphrase"
    volume = luks_volume(old)
    secret_path = vault.store_passphrase(SUB, volume.uuid, old)
    assert dashboard.open(vault.open_payload(secret_path)).state == "mounted"
    (MOUNTPOINT / "kept.txt").write_text("written before the rotation")
    argv = [LUKSCTL, "--json", *rotate_args(vault, secret_path)]
    token = Path(f"/run/lifecycle-token-{ROTATE_POLICY}").read_text().strip()
    with watch_for_leaks({"old passphrase": old.encode(), "rotation token": token.encode()}) as watch:
        done = subprocess.run(argv, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    new = stored(vault, secret_path)
    assert new != old and kernel_state(volume) == ("mounted", True), "rotation must not unmount"
    assert opens(volume, new) and not opens(volume, old)

    watch.needles["new passphrase"] = new.encode()
    watch.assert_nothing_leaked()  # /proc, syslog and every log written meanwhile
    assert not [s for s in (old, new, token) if s.encode() in done.stdout + done.stderr]

    put_back_closed(volume)
    assert dashboard.open(vault.open_payload(secret_path)).state == "mounted"
    assert (MOUNTPOINT / "kept.txt").read_text() == "written before the rotation"


# ---------------------------------------------------------------------------------------------
# rotate SIGKILLed at each step, then run again


@pytest.fixture(scope="module")
def kill_volume():
    factory = VolumeFactory()
    yield factory("lifecycle kill-test first passphrase")
    factory.cleanup()


def pause_cryptsetup(subcommand: str, when: str) -> None:
    """cryptsetup stops itself (SIGSTOP) just before, or just after, running `subcommand`,
    so the test kills luksctl at exactly that step (a stand-in on the PATH, like CryptsetupCounter)."""
    run_it = f'exec {CRYPTSETUP} "$@"' if when == "before" else f'{CRYPTSETUP} "$@"; status=$?'
    pause_then = f"kill -STOP $$; {run_it}" if when == "before" else f"{run_it}; kill -STOP $$; exit $status"
    install_shim("cryptsetup", f'case " $* " in *" {subcommand} "*) {pause_then} ;; esac\nexec {CRYPTSETUP} "$@"\n')


def paused_cryptsetup(subcommand: str) -> int | None:
    for pid, process in processes().items():
        if str(CRYPTSETUP_WRAPPER).encode() in process.argv and subcommand.encode() in process.argv and process.state == "T":
            return pid
    return None


@pytest.mark.parametrize(("subcommand", "when"), [("luksAddKey", "before"), ("luksAddKey", "after"),
                                                  ("luksKillSlot", "before"), ("luksKillSlot", "after")],
                         ids=["before-luksAddKey", "after-luksAddKey", "after-vault-write", "after-luksKillSlot"])
def test_rotate_killed_at_a_step_then_run_again_opens_by_the_dashboards_flow(kill_volume, vault, dashboard, subcommand, when):
    volume = kill_volume
    volume.write_ini()
    put_back_closed(volume)
    secret_path = f"{SUB}/{volume.uuid}/storage_encryption"
    if stored_or_none(vault, secret_path) != volume.passphrase.decode():
        vault.store_passphrase(SUB, volume.uuid, volume.passphrase.decode())  # first run, or OpenBao restarted
    before = stored(vault, secret_path)
    pause_cryptsetup(subcommand, when)
    try:
        rotation = subprocess.Popen([LUKSCTL, "--json", *rotate_args(vault, secret_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: paused_cryptsetup(subcommand) is not None or rotation.poll() is not None, 200,
                   f"rotate to reach {when} {subcommand}", interval=0.05)
        assert rotation.poll() is None, rotation.communicate()
        rotation.kill()
        rotation.wait(30)
        os.kill(paused_cryptsetup(subcommand), signal.SIGKILL)
    finally:
        remove_shim("cryptsetup")

    # At the kill: what Vault holds opens the volume.
    in_vault = stored(vault, secret_path)
    assert opens(volume, in_vault), f"killed {when} {subcommand}: Vault's passphrase does not open the volume"
    assert (in_vault == before) == (subcommand == "luksAddKey"), "Vault is written after luksAddKey, before luksKillSlot"
    assert PENDING.exists()

    code, answer, stderr = luksctl(*rotate_args(vault, secret_path))
    assert code == 0, (answer, stderr)
    assert answer["resumed"] is True
    new = stored(vault, secret_path)
    assert not PENDING.exists() and opens(volume, new) and not opens(volume, before)
    volume.passphrase = new.encode()  # the next kill test starts from here
    reply = dashboard.open(vault.open_payload(secret_path))
    assert reply.state == "mounted", reply.response.text
    put_back_closed(volume)




# ---------------------------------------------------------------------------------------------
# the recovery key, header backups, decommission


def test_recovery_key_add_open_with_it_remove(luks_volume, dashboard):
    volume = luks_volume("lifecycle recovery test passphrase")
    with watch_for_leaks({"passphrase": volume.passphrase}) as watch:
        code, added, stderr = luksctl("recovery-key", "add", *FAST_SLOT, stdin=volume.passphrase + b"\n")
    assert code == 0, (added, stderr)
    key = added["recovery_key"]
    watch.needles["recovery key"] = key.encode()
    watch.assert_nothing_leaked()
    assert key not in stderr

    opened = subprocess.run([LUKSCTL, "open"], input=key.encode() + b"\n", capture_output=True, timeout=300)
    assert opened.returncode == 0, opened.stdout + opened.stderr
    assert kernel_state(volume) == ("mounted", True) and dashboard.status().state == "mounted"
    put_back_closed(volume)

    code, answer, stderr = luksctl("recovery-key", "remove", stdin=key.encode())
    assert code == 7 and "recovery key itself" in answer["error"], (answer, stderr)
    code, answer, stderr = luksctl("recovery-key", "remove", stdin=volume.passphrase)
    assert code == 0 and answer["removed_slots"] == [added["recovery_slot"]], (answer, stderr)
    assert not opens(volume, key) and opens(volume, volume.passphrase)


def test_header_verify_after_a_rotation_and_restore_refuses_another_volume(luks_volume, vault):
    other = luks_volume("another volume")
    other_backup = Path("/run/lifecycle-other-header.bck")
    other_backup.unlink(missing_ok=True)
    run(CRYPTSETUP, "luksHeaderBackup", other.loop, "--header-backup-file", str(other_backup))
    volume = luks_volume("lifecycle header test passphrase")  # the ini now names this one
    assert luksctl("header", "backup")[0] == 0
    before_rotation = HEADER_BACKUP.read_bytes()
    secret_path = vault.store_passphrase(SUB, volume.uuid, volume.passphrase.decode())
    assert luksctl(*rotate_args(vault, secret_path))[0] == 0

    HEADER_BACKUP.write_bytes(before_rotation)  # the backup as it was: rotate itself wrote a fresh one
    code, answer, _ = luksctl("header", "verify")
    assert code == 8 and answer["header_backup"]["matches"] is False and answer["header_backup"]["keyslots_current"] is False
    assert luksctl("header", "backup")[0] == 0
    code, answer, _ = luksctl("header", "verify")
    assert code == 0 and answer["header_backup"]["matches"] is True

    HEADER_BACKUP.write_bytes(other_backup.read_bytes())  # root's, with its checksum: only the uuid tells it apart
    Path(f"{HEADER_BACKUP}.sha256").write_text(f"{hashlib.sha256(other_backup.read_bytes()).hexdigest()}  {HEADER_BACKUP.name}\n")
    device_before = Path(volume.loop).read_bytes()[:16 << 20]
    code, answer, _ = luksctl("header", "restore", "--yes")
    assert code == 7 and "not of this volume" in answer["error"]
    assert Path(volume.loop).read_bytes()[:16 << 20] == device_before
    other_backup.unlink()


def test_decommission_leaves_nothing_that_opens_the_volume(luks_volume, vault, dashboard):
    volume = luks_volume("lifecycle decommission passphrase")
    secret_path = vault.store_passphrase(SUB, volume.uuid, volume.passphrase.decode())
    assert dashboard.open(vault.open_payload(secret_path)).state == "mounted"
    backup = HEADER_BACKUP.read_bytes()
    assert run(CRYPTSETUP, "open", "--test-passphrase", "--key-file=-", "--header", str(HEADER_BACKUP), volume.loop,
               input=volume.passphrase, check=False).returncode == 0  # the backup opened it until now

    code, answer, stderr = luksctl("decommission", "--yes", *vault_args(vault, secret_path, DELETE_ONLY))

    assert code == 0, (answer, stderr)
    assert kernel_state(volume) == ("unmounted", False) and dashboard.status().state == "unavailable"
    assert not opens(volume, volume.passphrase)
    assert not HEADER_BACKUP.exists() and not VOLUME_INI.exists()
    assert backup  # it was there; now no file under /etc/luks holds a header of this volume
    assert not [p for p in Path("/etc/luks").iterdir() if p.is_file() and volume.uuid.encode() in p.read_bytes()[:1 << 20]]
    assert requests.get(f"{vault.url}/v1/secrets/metadata/{secret_path}", headers={"X-Vault-Token": "root"}, timeout=30).status_code == 404
