"""The key lifecycle on a real kernel: rotate (mounted, and SIGKILLed at each cryptsetup step
and at each of its file operations), a destroyed header restored, the recovery key, header
backup verify/restore and decommission, each ending with what the dashboard's flow can (or,
after decommission, cannot) open.

Cheap by design: new keyslots use a fast PBKDF (`--pbkdf pbkdf2 --iter-time 1`), the
kill and destroyed-header tests share one volume, and the OpenBao and API of the session are reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import requests

from helpers_vm import (CRYPTSETUP, HEADER_BACKUP, LUKS_DIR, MOUNTPOINT, OUT, VOLUME_INI, Volume, VolumeFactory, kernel_state, opens, put_back_closed, run,
                        stored, token_file, wait_until)
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


def stored_or_none(bao, secret_path: str) -> str | None:
    try:
        return stored(bao, secret_path)
    except requests.HTTPError:  # none yet, or OpenBao was restarted and forgot it
        return None


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
    token = Path(argv[argv.index("--token-file") + 1]).read_text().strip()
    with watch_for_leaks({"old passphrase": old.encode(), "rotation token": token.encode()}) as watch:
        done = subprocess.run(argv, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    new = stored(vault, secret_path)
    assert new != old and kernel_state(volume) == ("mounted", True), "rotation must not unmount"
    assert opens(volume.loop, new) and not opens(volume.loop, old)

    watch.needles["new passphrase"] = new.encode()
    assert watch.execs.ran(b"cryptsetup"), "no exec of cryptsetup recorded"
    watch.assert_nothing_leaked()  # every argv, the environments, syslog and every log written meanwhile
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


def kill_at_cryptsetup(argv: list[str], subcommand: str, when: str) -> None:
    """Runs luksctl `argv` and SIGKILLs it while cryptsetup `subcommand` is paused (`when`: just
    before it ran, or just after, its work done), then kills the paused cryptsetup too."""
    pause_cryptsetup(subcommand, when)
    try:
        command = subprocess.Popen([LUKSCTL, "--json", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: paused_cryptsetup(subcommand) is not None or command.poll() is not None, 200,
                   f"luksctl {argv[0]} to reach {when} {subcommand}", interval=0.05)
        assert command.poll() is None, f"luksctl {argv[0]} ended before {subcommand}: {command.communicate()}"
        command.kill()
        command.wait(30)
        os.kill(paused_cryptsetup(subcommand), signal.SIGKILL)
    finally:
        remove_shim("cryptsetup")


def shared_volume(volume: Volume, vault) -> str:
    """The module's volume, closed and described by the ini, its passphrase in Vault; the secret's path."""
    volume.write_ini()
    put_back_closed(volume)
    volume.link_by_uuid()  # a header test removes it, as udev does when the header goes
    secret_path = f"{SUB}/{volume.uuid}/storage_encryption"
    if stored_or_none(vault, secret_path) != volume.passphrase.decode():
        vault.store_passphrase(SUB, volume.uuid, volume.passphrase.decode())  # first run, or OpenBao restarted
    return secret_path


def scratch_copies() -> list[Path]:
    """Header copies in luksctl's scratch directories (header._private_dir): each opens the volume."""
    return sorted(LUKS_DIR.glob(".luksctl-*"))


def leftovers() -> list[str]:
    """What a killed run may leave in /etc/luks: scratch header copies, and temporaries of
    interrupted writes (durable.write_atomically's `.name.<hex>.tmp`)."""
    return sorted(path.name for path in LUKS_DIR.iterdir() if path.name.startswith(".luksctl-") or path.name.endswith(".tmp"))


def files_holding(secrets: dict[str, str]) -> list[tuple[str, str]]:
    """(secret's name, file) for each file under /etc/luks that holds one of `secrets`."""
    return [(name, str(path)) for path in LUKS_DIR.rglob("*") if path.is_file()
            for name, secret in secrets.items() if secret.encode() in path.read_bytes()]


@pytest.mark.parametrize(("subcommand", "when"), [("luksAddKey", "before"), ("luksAddKey", "after"),
                                                  ("luksKillSlot", "before")],
                         ids=["before-luksAddKey", "after-luksAddKey", "after-vault-write"])
def test_rotate_killed_at_a_step_then_run_again_opens_by_the_dashboards_flow(kill_volume, vault, dashboard, subcommand, when):
    """Killed after luksKillSlot (before the header backup's first file operation), and while the
    backup's header copy is in its scratch directory, are cases of the next test."""
    volume = kill_volume
    secret_path = shared_volume(volume, vault)
    before = stored(vault, secret_path)
    kill_at_cryptsetup(rotate_args(vault, secret_path), subcommand, when)

    # At the kill: what Vault holds opens the volume.
    in_vault = stored(vault, secret_path)
    assert opens(volume.loop, in_vault), f"killed {when} {subcommand}: Vault's passphrase does not open the volume"
    assert (in_vault == before) == (subcommand == "luksAddKey"), "Vault is written after luksAddKey, before luksKillSlot"
    assert PENDING.exists()

    code, answer, stderr = luksctl(*rotate_args(vault, secret_path))
    assert code == 0, (answer, stderr)
    assert answer["resumed"] is True
    new = stored(vault, secret_path)
    assert not PENDING.exists() and opens(volume.loop, new) and not opens(volume.loop, before)
    assert not leftovers(), f"killed {when} {subcommand}, the re-run left {leftovers()} in {LUKS_DIR}"
    volume.passphrase = new.encode()  # the next kill test starts from here
    reply = dashboard.open(vault.open_payload(secret_path))
    assert reply.state == "mounted", reply.response.text
    put_back_closed(volume)


# rotate SIGKILLed at each of its own file operations: strace (not a hook in the product) kills it
# on entry to the Nth call of one syscall, which is exactly between two file writes.

STRACE = "/usr/bin/strace"
# Every syscall that adds, replaces or removes a directory entry; writes go to a temporary that one
# of these renames into place, so a kill on entry to each is a kill between every pair of writes.
FILE_OPERATIONS = "rename,renameat,renameat2,link,linkat,unlink,unlinkat,mkdir,mkdirat,rmdir"
TRACED_CALL = re.compile(r"(?P<call>\w+)\((?P<args>.*)\)\s+= (?P<result>-?\d+|\?)(?: .*)?")
RANDOM_PARTS = re.compile(r"\.[0-9a-f]{8}\.tmp|\.luksctl-\d+-[^/\"]+")  # a temporary's hex, a scratch directory's pid and letters


class KillPoint(NamedTuple):
    call: str
    nth: int  # as strace's when= counts: this syscall's invocations, failed ones included
    seen: str  # the call as strace printed it in the counting run, random parts masked

    def __str__(self) -> str:
        return f"{self.seen}, {self.call} call no. {self.nth}"


def masked(call: str, args: str) -> str:
    return RANDOM_PARTS.sub(lambda m: ".<hex>.tmp" if m[0].endswith(".tmp") else ".luksctl-<pid>-<random>", f"{call}({args})")


def file_operations(log: Path) -> list[KillPoint]:
    """Each call in an strace log that changed a directory (returned 0), where a kill can land."""
    counted: Counter = Counter()
    points = []
    for line in log.read_text().splitlines():
        traced = TRACED_CALL.fullmatch(line)
        if traced:
            counted[traced["call"]] += 1
            if traced["result"] == "0":
                points.append(KillPoint(traced["call"], counted[traced["call"]], masked(traced["call"], traced["args"])))
    return points


def killed_on(log: Path) -> str | None:
    """The call a kill landed on: strace prints it with result `?`, then `+++ killed by SIGKILL +++`."""
    lines = log.read_text().splitlines()
    traced = TRACED_CALL.fullmatch(lines[-2]) if len(lines) >= 2 and lines[-1] == "+++ killed by SIGKILL +++" else None
    return masked(traced["call"], traced["args"]) if traced and traced["result"] == "?" else None


def traced_rotate(vault, secret_path: str, log: Path, kill: KillPoint | None = None) -> subprocess.CompletedProcess:
    inject = ["-e", f"inject={kill.call}:signal=KILL:when={kill.nth}"] if kill else []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc written: every run makes the same file operations
    return subprocess.run([STRACE, "-o", str(log), "-e", f"trace={FILE_OPERATIONS}", *inject, LUKSCTL, "--json", *rotate_args(vault, secret_path)],
                          env=env, capture_output=True, timeout=300)


def test_rotate_killed_at_each_of_its_file_operations_then_run_again_opens_by_the_dashboards_flow(kill_volume, vault, dashboard):
    """Issue 24: a kill between rotate's pending writes needed a person. Here every file operation
    of a rotation (pending file, scratch header copy, header backup, checksum, removals) is a kill
    point, found by tracing one rotation; after each kill the re-run finishes and the dashboard opens."""
    assert Path(STRACE).exists(), f"{STRACE} is missing: scripts/install-host-deps.sh installs it on the host, whose root the guest runs"
    volume = kill_volume
    secret_path = shared_volume(volume, vault)
    counting = OUT / "rotate-file-operations.strace"
    done = traced_rotate(vault, secret_path, counting)
    assert done.returncode == 0, f"rotate under strace exited {done.returncode}: {done.stdout + done.stderr}"
    volume.passphrase = stored(vault, secret_path).encode()
    points = file_operations(counting)
    holding_a_copy = []  # kill points that left a scratch header copy (issue 24: it outlived every re-run)
    # the pending file, the scratch directory and its header copy, backup, checksum, the pending file removed
    assert len(points) >= 7, f"rotate made only these file operations: {points} (see {counting})"

    for number, point in enumerate(points, 1):
        where = f"killed on file operation {number} of {len(points)}, {point}"
        before = volume.passphrase.decode()
        log = OUT / f"rotate-killed-{number}.strace"
        killed = traced_rotate(vault, secret_path, log, point)
        assert killed.returncode == -signal.SIGKILL, f"{where}: rotate was not killed there but exited {killed.returncode} (see {log}): {killed.stdout + killed.stderr}"
        assert killed_on(log) == point.seen, f"{where}: the kill landed on {killed_on(log)} instead: the run made other file operations than the counting run (see {log})"
        in_vault = stored(vault, secret_path)
        assert opens(volume.loop, in_vault), f"{where}: the passphrase in Vault does not open the volume"
        holding_a_copy += [str(point) for path in scratch_copies() if (path / "header").is_file()]

        code, answer, stderr = luksctl(*rotate_args(vault, secret_path))
        assert code == 0, f"{where}: the re-run exited {code}: {answer} {stderr}"
        new = stored(vault, secret_path)
        volume.passphrase = new.encode()
        assert not PENDING.exists() and not opens(volume.loop, before), f"{where}: the re-run did not finish the rotation"
        assert not files_holding({"old passphrase": before, "new passphrase": new}), f"{where}: {files_holding({'old': before, 'new': new})}"
        assert not leftovers(), f"{where}: the re-run left {leftovers()} in {LUKS_DIR} (a header copy, or an interrupted write's temporary)"
        reply = dashboard.open(vault.open_payload(secret_path))
        assert reply.state == "mounted", f"{where}: the dashboard's open answered {reply.response.status_code} {reply.response.text}"
        put_back_closed(volume)
    assert holding_a_copy, f"no kill left a scratch header copy for the re-run to remove: {points}"


# ---------------------------------------------------------------------------------------------
# a destroyed header: both LUKS2 header copies zeroed, then verify and restore (issue 24)


def zero_both_header_copies(device: str) -> None:
    """The first 32 KiB: a LUKS2 header and its second copy (16 KiB each, cryptsetup's default)."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, bytes(32 << 10))
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of_start(device: str, size: int = 16 << 20) -> str:
    """What a header restore could write: the backup's size (16 MiB) from the start."""
    with open(device, "rb") as stream:
        return hashlib.sha256(stream.read(size)).hexdigest()


def another_volumes_backup() -> Path:
    """The header backup of a volume that is not this one, with its checksum recorded as luksctl records it."""
    image, backup = VolumeFactory.workdir / "other-volume.img", Path("/run/lifecycle-other-header.bck")
    for path in (image, backup):
        path.unlink(missing_ok=True)
    with image.open("xb") as f:
        f.truncate(20 << 20)
    run(CRYPTSETUP, "luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--batch-mode",
        "--key-file=-", str(image), input=b"another volume")
    run(CRYPTSETUP, "luksHeaderBackup", str(image), "--header-backup-file", str(backup))
    image.unlink()
    return backup


@pytest.mark.parametrize("state", ["mounted", "closed"])
def test_both_header_copies_zeroed_then_verify_answers_8_and_restore_brings_the_volume_back(kill_volume, vault, dashboard, state):
    """Issue 24: verify answered 4 ("not attached") and restore refused, as both found the device by
    the uuid the header held. Here udev's by-uuid link goes with the header, as it does on a real
    system; mounted, the ini's device finds it; closed, the ini names none (as older tools wrote it)
    and --device does, after a backup of another volume was refused with nothing written."""
    volume = kill_volume
    secret_path = shared_volume(volume, vault)
    code, answer, stderr = luksctl("header", "backup")
    assert code == 0, (answer, stderr)
    if state == "mounted":
        assert dashboard.open(vault.open_payload(secret_path)).state == "mounted"
        (MOUNTPOINT / "kept.txt").write_text("written before the header was destroyed")
    device_args = []
    try:
        zero_both_header_copies(volume.loop)
        volume.by_uuid.unlink()  # no header, no uuid: udev removes the link
        if state == "closed":
            VOLUME_INI.write_text("".join(line for line in VOLUME_INI.read_text().splitlines(keepends=True) if not line.startswith("device =")))
            device_args = ["--device", volume.loop]
        assert run(CRYPTSETUP, "isLuks", volume.loop, check=False).returncode != 0, "the header is still there: cryptsetup recovered a copy"

        code, answer, stderr = luksctl("header", "verify", *device_args)
        assert code == 8, f"verify on a destroyed header exited {code}, not 8: {answer} {stderr}"
        assert answer["header_backup"]["device_header_missing"] is True and answer["header_backup"]["matches"] is False, answer

        if state == "closed":
            ours, ours_checksum = HEADER_BACKUP.read_bytes(), Path(f"{HEADER_BACKUP}.sha256").read_text()
            other = another_volumes_backup()
            HEADER_BACKUP.write_bytes(other.read_bytes())
            Path(f"{HEADER_BACKUP}.sha256").write_text(f"{hashlib.sha256(other.read_bytes()).hexdigest()}  {HEADER_BACKUP.name}\n")
            other.unlink()
            device_before = sha256_of_start(volume.loop)
            code, answer, stderr = luksctl("header", "restore", "--yes", *device_args)
            assert code == 7 and "not of this volume" in answer.get("error", ""), f"another volume's backup: exit {code}, {answer} {stderr}"
            assert sha256_of_start(volume.loop) == device_before, "the refused restore wrote to the device"
            HEADER_BACKUP.write_bytes(ours)
            Path(f"{HEADER_BACKUP}.sha256").write_text(ours_checksum)

        code, answer, stderr = luksctl("header", "restore", "--yes", *device_args)
        assert code == 0 and answer["restored_from"] == str(HEADER_BACKUP), f"restore exited {code}: {answer} {stderr}"
    finally:
        volume.write_ini()
        volume.link_by_uuid()  # the header, and with it the uuid, is back: so is udev's link

    assert run(CRYPTSETUP, "luksUUID", volume.loop).stdout.decode().strip() == volume.uuid
    if state == "mounted":
        assert kernel_state(volume) == ("mounted", True), "restoring the header under a mounted volume unmounted it"
        assert (MOUNTPOINT / "kept.txt").read_text() == "written before the header was destroyed"
        put_back_closed(volume)
    reply = dashboard.open(vault.open_payload(secret_path))
    assert reply.state == "mounted", f"after the restore the dashboard's open answered {reply.response.status_code} {reply.response.text}"
    if state == "mounted":
        assert (MOUNTPOINT / "kept.txt").read_text() == "written before the header was destroyed"
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
    assert watch.execs.ran(b"cryptsetup"), "no exec of cryptsetup recorded"
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
    assert not opens(volume.loop, key) and opens(volume.loop, volume.passphrase)


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

    kill_at_cryptsetup(["header", "backup"], "luksHeaderBackup", "after")  # issue 24: its scratch copy outlived decommission
    left = [str(path) for path in scratch_copies() if (path / "header").is_file()]
    assert left, f"the killed header backup left no header copy to test with: {scratch_copies()}"

    code, answer, stderr = luksctl("decommission", "--yes", *vault_args(vault, secret_path, DELETE_ONLY))

    assert code == 0, (answer, stderr)
    assert not leftovers() and set(left) <= set(answer["removed_files"]), f"decommission left {leftovers()}, removed {answer['removed_files']}"
    assert kernel_state(volume) == ("unmounted", False) and dashboard.status().state == "unavailable"
    erased = run(CRYPTSETUP, "open", "--test-passphrase", "--key-file=-", volume.loop, input=volume.passphrase, check=False)
    assert (erased.returncode, erased.stderr) == (1, b"No usable keyslot is available.\n"), erased  # every keyslot erased
    assert not HEADER_BACKUP.exists() and not VOLUME_INI.exists()
    assert backup  # it was there; now no file under /etc/luks holds a header of this volume
    assert not [p for p in Path("/etc/luks").iterdir() if p.is_file() and volume.uuid.encode() in p.read_bytes()[:1 << 20]]
    assert requests.get(f"{vault.url}/v1/secrets/metadata/{secret_path}", headers={"X-Vault-Token": "root"}, timeout=30).status_code == 404
