"""`luksctl rotate --reencrypt` and `reencrypt` on a real kernel: a new passphrase and a new volume
key while the volume stays mounted and written to, the dashboard's status answering throughout; an
online run SIGKILLed at three points that re-runs recover and resume, the dashboard's open working after each kill. (An offline run's
resume is tested on image files, tests/unit/test_reencrypt_files.py: here 48 MiB re-encrypt
offline before a poller sees the header's requirement.)

Cheap by design: the 64 MiB volumes of VolumeFactory (48 MiB of data), pbkdf2 at 1000 iterations
for the volume and `--pbkdf pbkdf2 --iter-time 1` for the new keyslots, the session's OpenBao and API.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers_vm import (CRYPTSETUP, HEADER_BACKUP, MOUNTPOINT, Dashboard, Volume, mapped, opens, put_back_closed, reencrypting, run, stored,
                        suspended, token_file, volume_key_digest)
from leaks import watch_for_leaks
from support.policies import READ_POLICY

LUKSCTL = "/usr/local/sbin/luksctl"
FAST_SLOT = ["--pbkdf", "pbkdf2", "--iter-time", "1"]
SUB = "reencrypt-user-sub"
OLD_KEY_FILE = Path("/run/reencrypt-test-old-volume-key")  # test only: what `dmsetup table --showkeys` showed an administrator
OLD_KEY_VIEW = "reencrypt-old-key-view"
OLD_BACKUP = Path("/run/reencrypt-test-old-header-backup")
ROTATE_POLICY = "luksctl-reencrypt-rotate"  # read + update: what rotation needs
EXT4_MAGIC_AT, EXT4_MAGIC = 1024 + 56, b"\x53\xef"  # the superblock's s_magic, little-endian
BLOCK = 4096
REFERENCE_SIZE = 4 << 20

# Writes blocks of 4 KiB, each its sha256 then random bytes, 64 to a file, each file fsynced, until
# the stop file appears or the cap is reached (the filesystem is 48 MiB); then prints how many.
WRITER = """
import hashlib, os, sys
directory, stop, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(directory, exist_ok=True)
written = 0
while not os.path.exists(stop):
    if written < cap:
        blocks = b"".join(hashlib.sha256(body).digest() + body for body in (os.urandom(4096 - 32) for _ in range(64)))
        with open(os.path.join(directory, f"blocks-{written // 64:05d}"), "wb") as stream:
            stream.write(blocks)
            stream.flush()
            os.fsync(stream.fileno())
        written += 64
print(written, flush=True)
"""


def reencrypt_argv(bao, secret_path: str, token_path: str | None = None) -> list[str]:
    return [LUKSCTL, "--json", "reencrypt", *FAST_SLOT, "--vault-url", bao.url, "--vault-allow-http",
            "--secret-path", secret_path, "--token-file", token_path or token_file(bao, READ_POLICY)]


def old_key_fits(volume: Volume) -> bool:
    result = run(CRYPTSETUP, "open", "--test-passphrase", "--volume-key-file", str(OLD_KEY_FILE), volume.loop, check=False)
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


def capture_old_key(volume: Volume) -> str:
    """The volume key, as an administrator could have kept it: in a file (for cryptsetup), and as the
    dm table of the open volume with that key in it (LUKS2 keeps the key in the kernel keyring, so
    the live table names the keyring instead: the key from the dump goes in its place)."""
    OLD_KEY_FILE.unlink(missing_ok=True)
    run(CRYPTSETUP, "luksDump", "--dump-volume-key", "--volume-key-file", str(OLD_KEY_FILE), "--batch-mode", "--key-file=-", volume.loop,
        input=volume.passphrase)
    assert old_key_fits(volume)
    fields = run("dmsetup", "table", volume.cryptdev).stdout.decode().split()
    assert fields[2] == "crypt", fields
    fields[4] = OLD_KEY_FILE.read_bytes().hex()  # start length crypt cipher KEY iv_offset device offset [options]
    table = " ".join(fields) + "\n"
    assert ext4_magic_with(table) == EXT4_MAGIC, "the table built from the old key decrypts the volume now"
    return table


def ext4_magic(device: str) -> bytes:
    with open(device, "rb") as stream:
        stream.seek(EXT4_MAGIC_AT)
        return stream.read(2)


def ext4_magic_with(table: str) -> bytes:
    """The filesystem's magic as a read-only mapping with this table (a key, a device) decrypts it."""
    run("dmsetup", "create", "--readonly", OLD_KEY_VIEW, input=table.encode())
    try:
        return ext4_magic(f"/dev/mapper/{OLD_KEY_VIEW}")
    finally:
        run("dmsetup", "remove", OLD_KEY_VIEW)


def write_reference() -> str:
    data = os.urandom(REFERENCE_SIZE)
    (MOUNTPOINT / "reference.bin").write_bytes(data)
    run("sync")
    return hashlib.sha256(data).hexdigest()


def bad_blocks(directory: Path) -> tuple[int, list[str]]:
    """(blocks read, those whose sha256 does not match their content)."""
    count, bad = 0, []
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        for at in range(0, len(data), BLOCK):
            block = data[at:at + BLOCK]
            count += 1
            if hashlib.sha256(block[32:]).digest() != block[:32]:
                bad.append(f"{path.name}@{at}")
    return count, bad


class StatusPoller(threading.Thread):
    """Asks the API for the status the whole time; counts what failed. Over one kept-alive
    connection, unlike the dashboard: with the guest's one vCPU doing the re-encryption's AES
    in software, a new TLS handshake for every poll outlasted nginx's 10 s header timeout once
    in 54 polls in two runs of 2026-12-06. Every poll still goes through nginx to the app."""

    def __init__(self, dashboard) -> None:
        super().__init__(daemon=True)
        self.dashboard = Dashboard(dashboard.base_url, keep_alive=True)
        self.answers, self.failures = 0, []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                reply = self.dashboard.status()
                if reply.response.status_code != 200 or reply.state != "mounted":
                    self.failures.append(f"{reply.response.status_code} {reply.response.text[:200]}")
            except Exception as exc:  # noqa: BLE001 - any failure is what this counts
                self.failures.append(repr(exc))
            self.answers += 1
            self.stopping.wait(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.join(120)


def mounted_volume(luks_volume, vault, dashboard, passphrase: str) -> tuple[Volume, str]:
    volume = luks_volume(passphrase)
    secret_path = vault.store_passphrase(SUB, volume.uuid, passphrase)
    reply = dashboard.open(vault.open_payload(secret_path))
    assert reply.state == "mounted", reply.response.text
    return volume, secret_path


def test_rotate_reencrypt_of_a_mounted_volume_written_to_the_whole_time_leaves_nothing_from_before_that_opens(
        luks_volume, bao_up, dashboard):
    """`rotate --reencrypt`, a suspected compromise's answer: a new passphrase in Vault, a new volume
    key under the writer, a new header backup; afterwards the old passphrase, the old header backup and
    the old volume key open nothing. (Plain `reencrypt` online: the kill test below, start to end.)"""
    vault = bao_up
    vault.put_policy(ROTATE_POLICY, 'path "secrets/data/*" { capabilities = ["read", "update"] }')
    passphrase = "reencrypt mounted passphrase"
    volume, secret_path = mounted_volume(luks_volume, vault, dashboard, passphrase)
    reference = write_reference()
    digest_before = volume_key_digest(volume)
    old_table = capture_old_key(volume)
    run(LUKSCTL, "header", "backup")
    OLD_BACKUP.write_bytes(HEADER_BACKUP.read_bytes())
    version_before = secret_version(vault, secret_path)

    stop = MOUNTPOINT / "stop-writing"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(MOUNTPOINT / "blocks"), str(stop), str((16 << 20) // BLOCK)],
                              stdout=subprocess.PIPE, text=True)
    poller = StatusPoller(dashboard)
    poller.start()
    token_path = token_file(vault, ROTATE_POLICY)
    token = Path(token_path).read_text().strip()
    argv = [LUKSCTL, "--json", "rotate", "--reencrypt", *FAST_SLOT, "--vault-url", vault.url, "--vault-allow-http",
            "--secret-path", secret_path, "--token-file", token_path]
    try:
        with watch_for_leaks({"passphrase": passphrase.encode(), "token": token.encode()}) as watch:
            command = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            during = dashboard.open(vault.open_payload(secret_path))  # mounted all along: the answer says so
            stdout, stderr = command.communicate(timeout=1800)
    finally:
        stop.touch()
        blocks_written = int(writer.communicate(timeout=300)[0])
        poller.stop()
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert command.returncode == 0, (lines[-1:], stderr)
    answer = lines[-1]
    assert answer["reencryption"]["online"] is True and answer["reencryption"]["resumed"] is False and answer["volume_state"] == "mounted"
    assert lines[:-1] and all(line["event"] == "reencrypt" for line in lines[:-1]) and lines[-2]["percent"] == 100
    assert during.state == "mounted", during.response.text
    assert poller.answers > 0 and poller.failures == [], poller.failures
    watch.assert_nothing_leaked()

    new = stored(vault, secret_path)
    assert secret_version(vault, secret_path) == version_before + 1 == answer["vault_version"]
    assert volume_key_digest(volume) != digest_before and not reencrypting(volume)
    assert opens(volume.loop, new) and not opens(volume.loop, passphrase), "the old passphrase still opens the volume"
    assert not old_key_fits(volume), "the old volume key still matches the header"
    # The old backup still yields a volume key with the old passphrase: the old one, which no longer fits.
    assert opens(str(OLD_BACKUP), passphrase) and volume_key_from(OLD_BACKUP, passphrase) == OLD_KEY_FILE.read_bytes()
    assert opens(str(HEADER_BACKUP), new) and not opens(str(HEADER_BACKUP), passphrase), "the header backup was not rewritten"
    OLD_BACKUP.unlink()
    assert blocks_written > 0

    put_back_closed(volume)
    assert ext4_magic_with(old_table) != EXT4_MAGIC, "the old volume key still decrypts the device"
    OLD_KEY_FILE.unlink(missing_ok=True)
    reply = dashboard.open(vault.open_payload(secret_path))
    assert reply.state == "mounted", reply.response.text
    assert ext4_magic(volume.mapper) == EXT4_MAGIC
    count, bad = bad_blocks(MOUNTPOINT / "blocks")
    assert count == blocks_written and bad == [], f"{len(bad)} of {count} blocks differ: {bad[:10]}"
    assert hashlib.sha256((MOUNTPOINT / "reference.bin").read_bytes()).hexdigest() == reference


def secret_version(vault, secret_path: str) -> int:
    return vault.request("GET", f"secrets/data/{secret_path}").json()["data"]["metadata"]["version"]


def volume_key_from(header: Path, passphrase: str) -> bytes:
    key = Path("/run/reencrypt-test-key-from-the-old-backup")
    key.unlink(missing_ok=True)
    run(CRYPTSETUP, "luksDump", "--dump-volume-key", "--volume-key-file", str(key), "--batch-mode", "--key-file=-", str(header),
        input=passphrase.encode())
    try:
        return key.read_bytes()
    finally:
        key.unlink()


def killed_when(argv: list[str], ready, what: str) -> None:
    """Runs luksctl in its own session and SIGKILLs all of it (luksctl and its cryptsetup, as
    `systemctl kill` would) as soon as ready() is true."""
    command = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 900
    while not ready():
        if command.poll() is not None:
            pytest.fail(f"luksctl reencrypt ended (exit {command.returncode}) before {what}: nothing was killed mid-way; "
                        f"{command.stderr.read()[-2000:]!r}")
        assert time.monotonic() < deadline, f"no {what} after 900 s"
        time.sleep(0.01)
    os.killpg(command.pid, signal.SIGKILL)
    command.wait(60)


def resumed(vault, secret_path: str) -> dict:
    done = subprocess.run(reencrypt_argv(vault, secret_path), capture_output=True, timeout=1800)
    answer = json.loads(done.stdout.splitlines()[-1])
    assert done.returncode == 0, (answer, done.stderr[-2000:])
    return answer


def test_killed_online_three_times_a_rerun_recovers_and_resumes_and_the_data_is_byte_exact(luks_volume, bao_up, dashboard):
    """Killed in the first hotzone of a fresh run, its I/O suspended while cryptsetup rewrites it;
    then in the re-run's recovery of the device stack that kill left (the mapping just removed, the
    volume unmounted); then in the run that resumed after it. The first kill once broke the volume:
    the recovery resumed the suspended hotzone device, and the filesystem did not mount again."""
    vault = bao_up
    volume, secret_path = mounted_volume(luks_volume, vault, dashboard, "reencrypt kill passphrase online")
    reference = write_reference()
    digest_before = volume_key_digest(volume)
    overlay = f"{volume.cryptdev}-overlay"

    hotzone = f"{volume.cryptdev}-hotzone-forward"
    killed_when(reencrypt_argv(vault, secret_path), lambda: suspended(hotzone), "its hotzone suspended")
    assert reencrypting(volume) and mapped(overlay), "the kill left no re-encryption in progress"
    assert suspended(hotzone), "the kill left the hotzone running: not the case under test"
    assert dashboard.status().state == "mounted"
    reply = dashboard.open(vault.open_payload(secret_path))
    assert reply.state == "mounted", reply.response.text

    killed_when(reencrypt_argv(vault, secret_path), lambda: not mapped(volume.cryptdev), "the recovery")
    assert reencrypting(volume)
    if not any(mapped(name) for name in (overlay, hotzone)):
        # Killed after the stack was gone and before the open: the volume is closed, and the dashboard opens it.
        reply = dashboard.open(vault.open_payload(secret_path))
        assert reply.state == "mounted", reply.response.text

    seen = {"recovered": False}

    def stack_again() -> bool:  # the resumed run's own stack, once the recovery has put the volume back
        seen["recovered"] = seen["recovered"] or (not mapped(overlay) and MOUNTPOINT.joinpath("reference.bin").exists())
        return seen["recovered"] and mapped(overlay)

    killed_when(reencrypt_argv(vault, secret_path), stack_again, "the resumed run's device stack")
    assert reencrypting(volume)

    answer = resumed(vault, secret_path)
    assert answer["resumed"] is True and answer["online"] is True and "resumed the re-encryption" in answer["steps"]
    assert volume_key_digest(volume) != digest_before and not reencrypting(volume)
    assert not mapped(overlay)
    assert hashlib.sha256((MOUNTPOINT / "reference.bin").read_bytes()).hexdigest() == reference

    put_back_closed(volume)
    reply = dashboard.open(vault.open_payload(secret_path))
    assert reply.state == "mounted", reply.response.text
    assert hashlib.sha256((MOUNTPOINT / "reference.bin").read_bytes()).hexdigest() == reference, "data not byte-exact after the resume"
    assert subprocess.run([LUKSCTL, "header", "verify"], capture_output=True, timeout=300).returncode == 0
