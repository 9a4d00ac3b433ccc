"""`luksctl setup`: encrypt a blank volume, store its passphrase, make and mount the filesystem.

The order is what makes it safe (README, "Encrypting a volume"):

1. check everything, change nothing: the device is a blank, unused block device,
   no header backup or ini of someone else is in the way, the token may write;
2. save the passphrase to the journal (/etc/luks, root, 0600) before anything uses it;
3. store it in Vault (create only, cas=0) *before* formatting, so "the path already
   holds a secret" or "the token may not write" leaves the device untouched;
4. luksFormat, check the passphrase opens it, back up the header, write the ini;
5. open, (wipe), mkfs, mount, write the two success files;
6. only then delete the journal's copy of the passphrase.

Each step is recorded when done, and a step a kill may have left half done is
recorded as started, so running the same command again resumes where it stopped.
"""

from __future__ import annotations

import configparser
import io
import json
import logging
import secrets
import string
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .. import runner
from ..config import API_CONFIG, VOLUME_INI, FrontendConfig, VolumeConfig, load_json_config, load_volume_config
from ..durable import write_atomically
from ..errors import (
    DeviceInUse,
    DeviceNotBlank,
    LuksctlError,
    SecretExists,
    SecretNotFound,
    SetupConflict,
    VaultDenied,
    VaultWriteDenied,
    WrongPassphrase,
)
from ..vault import SecretRef, VaultClient
from ..status import find_mapper_device, read_mounts, volume_status
from . import blockdev, cryptsetup, header, journal, volume
from .keystore_options import open_keystore
from .journal import Journal

log = logging.getLogger("luksctl")
Result = TypeVar("Result")

ENCRYPTION_SUCCESS = (Path("/var/run/fast-luks-encryption.success"), "LUKS encryption completed.")
VOLUME_SUCCESS = (Path("/var/run/fast-luks-volume-setup.success"), "Volume setup completed.")
PASSPHRASE_ALPHABET = string.ascii_letters + string.digits  # survives any shell, ini or JSON unquoted
MKFS_TIMEOUT = 6 * 3600  # mkfs on a multi-terabyte volume
WRITING_CAPABILITIES = frozenset({"create", "update", "root", "sudo"})


@dataclass(frozen=True)
class VaultTarget:
    url: str
    ref: SecretRef
    wrapped: bool = True  # a response-wrapping token (the dashboard's) rather than a plain one
    ca_bundle: str | None = None
    timeout: float = 10.0  # the whole Vault exchange
    token: str | None = field(default=None, repr=False)  # read before the setup lock (secret_input); None: not given
    allow_http: bool = False


@dataclass(frozen=True)
class SetupOptions:
    device: str
    cryptdev: str = "crypt"
    mountpoint: str = "/export"
    filesystem: str = "ext4"
    cipher: str = "aes-xts-plain64"
    key_size: int = 512
    hash: str = "sha256"
    pbkdf: str | None = "argon2id"
    iter_time: int | None = None
    pbkdf_force_iterations: int | None = None
    passphrase_length: int = 64
    passphrase: bytes | None = field(default=None, repr=False)  # the operator's own (stdin; fastluks -p)
    vault: VaultTarget | None = None
    wipe: bool = False
    dry_run: bool = False
    force: bool = False
    save_passphrase_locally: bool = False
    ini_path: Path = VOLUME_INI
    header_path: Path = cryptsetup.DEFAULT_HEADER_BACKUP
    state_dir: Path = journal.STATE_DIR

    def luks_format(self) -> cryptsetup.Format:
        return cryptsetup.Format(self.cipher, self.key_size, self.hash, cryptsetup.Pbkdf(self.pbkdf, self.iter_time, self.pbkdf_force_iterations))


class Progress:
    """Steps and wipe progress: JSON lines on stdout with --json, a percentage on a TTY's stderr."""

    def __init__(self, *, json_lines: bool, out=None, err=None, tty: bool | None = None):
        self.json_lines = json_lines
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = self.err.isatty() if tty is None else tty
        self.timings: dict[str, float] = {}
        self._last_percent = -1

    def step(self, name: str, message: str) -> None:
        if self.json_lines:
            print(json.dumps({"event": "step", "step": name, "message": message}), file=self.out, flush=True)
        else:
            log.info("%s", message)

    def wiped(self, done: int, total: int) -> None:
        percent = done * 100 // max(total, 1)
        if percent == self._last_percent:
            return
        self._last_percent = percent
        if self.json_lines:
            print(json.dumps({"event": "wipe", "bytes_done": done, "bytes_total": total, "percent": percent}), file=self.out, flush=True)
        elif self.tty:
            print(f"\rwiping: {percent:3d}% of {total // 2**20} MiB", end="\n" if done >= total else "", file=self.err, flush=True)

    def timed(self, name: str, action: Callable[[], Result]) -> Result:
        started = time.monotonic()
        try:
            return action()
        finally:
            self.timings[name] = round(self.timings.get(name, 0) + time.monotonic() - started, 3)


@dataclass
class SetupReport:
    volume_state: str
    device: str
    uuid: str | None = None
    changed: bool = False
    resumed: bool = False
    plan: list[str] | None = None
    seconds: dict[str, float] | None = None
    error: str | None = None


# --- inputs ---------------------------------------------------------------------------------


def generate_passphrase(length: int) -> bytes:
    return "".join(secrets.choice(PASSPHRASE_ALPHABET) for _ in range(length)).encode()


def ini_text(options: SetupOptions, uuid: str, passphrase: bytes | None = None) -> str:
    """The [luks] section with exactly the keys `luksctl open` reads (PROTOCOL §1)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser["luks"] = {
        "cipher_algorithm": options.cipher,
        "hash_algorithm": options.hash,
        "keysize": str(options.key_size),
        "device": options.device,
        "uuid": uuid,
        "cryptdev": options.cryptdev,
        "mapper": f"/dev/mapper/{options.cryptdev}",
        "mountpoint": options.mountpoint,
        "filesystem": options.filesystem,
        "header_path": str(options.header_path),
    }
    if passphrase is not None:  # fastluks --save-passphrase-locally, as pyluks did
        parser["luks"]["passphrase"] = passphrase.decode()
    text = io.StringIO()
    parser.write(text)
    return text.getvalue()


def validate_names(options: SetupOptions) -> None:
    """Check cryptdev, mountpoint and filesystem with the very code `luksctl open` will read them with."""
    with tempfile.TemporaryDirectory() as directory:
        probe = Path(directory) / options.ini_path.name
        probe.write_text(ini_text(options, "00000000-0000-4000-8000-000000000000"))
        load_volume_config(probe)
    if not 8 <= options.passphrase_length <= 512:
        raise LuksctlError("the passphrase length must be between 8 and 512 characters")
    if options.vault is None and not (options.passphrase or options.save_passphrase_locally):
        raise LuksctlError(
            "the passphrase would be stored nowhere: give the Vault location (--vault-url ...), "
            "or supply the passphrase yourself on stdin (--passphrase-stdin)"
        )


# --- checks that change nothing -------------------------------------------------------------


def already_set_up(options: SetupOptions) -> VolumeConfig | None:
    """The volume this command would make exists already: a re-run of a finished setup does nothing.
    Its ini and the device's LUKS UUID tell, not the success files: a reboot empties /var/run."""
    if not options.ini_path.exists():
        return None
    try:
        existing = load_volume_config(options.ini_path)
    except LuksctlError:
        return None
    if existing.device != options.device or existing.cryptdev != options.cryptdev or not cryptsetup.is_luks(options.device):
        return None
    return existing if cryptsetup.luks_uuid(options.device) == existing.uuid else None


def check_device(options: SetupOptions, device: blockdev.BlockDevice, resuming: Journal | None) -> None:
    """Refuse a device that is in use or, on a first run, not blank; --force overrides only "not blank"."""
    ours = options.cryptdev if resuming else None
    busy = blockdev.users(device, allowed_holder=ours)
    if busy:
        raise DeviceInUse(f"{options.device} is in use: {'; '.join(busy)}. setup changed nothing")
    mapper = find_mapper_device(options.cryptdev)
    if mapper is not None and options.cryptdev not in blockdev.holders(device).values():
        raise SetupConflict(f"the mapper name {options.cryptdev} is already used by another device; choose another --cryptdev")
    status = volume_status(options.cryptdev, options.mountpoint)
    if not status.mounted and any(m.mountpoint == options.mountpoint for m in read_mounts()):
        raise SetupConflict(f"something else is mounted on {options.mountpoint}; setup never unmounts what it did not mount")
    if resuming is None or not resuming.done(journal.FORMAT_STARTED):  # nothing of ours on it yet
        require_blank(options, device)
    if resuming is None:
        for path, what in ((options.header_path, "header backup"), (options.ini_path, "volume description")):
            if path.exists():
                raise SetupConflict(f"a {what} already exists at {path}; setup never overwrites it. Move it away first")


def require_blank(options: SetupOptions, device: blockdev.BlockDevice, untouched: str = "setup changed nothing") -> None:
    found = blockdev.signatures(device)
    if found and not options.force:
        raise DeviceNotBlank(
            f"{options.device} is not blank ({', '.join(found)}); {untouched}. "
            "If its content may be destroyed, run again with --force"
        )


def check_before_format(options: SetupOptions, record: Journal) -> None:
    """The path resolved again just before luksFormat (the Vault exchange, or a whole reboot, came
    between): the same disk as recorded, in use by nothing, and blank unless our format started."""
    device = blockdev.block_device(options.device)
    _require_same_disk(options, record.state, device)
    busy = blockdev.users(device)
    if busy:
        raise DeviceInUse(f"{options.device} is in use: {'; '.join(busy)}. It was not formatted")
    if not record.done(journal.FORMAT_STARTED):  # the passphrase may be in Vault by now: say what was kept
        require_blank(options, device, f"it was not formatted, and the passphrase stays in {record.passphrase_path}")


def _require_same_disk(options: SetupOptions, state: dict, device: blockdev.BlockDevice) -> None:
    recorded = state.get("identity")  # None: a journal of a version that recorded none
    if recorded is not None and recorded != blockdev.identity(device):
        raise SetupConflict(
            f"{options.device} is not the disk the unfinished setup in {options.state_dir / journal.STATE_FILE} began on "
            f"(it recorded {recorded}, this one is {blockdev.identity(device)}); attach that disk, or move the journal away"
        )


def check_resume(options: SetupOptions, state: dict, device: blockdev.BlockDevice, description: dict) -> None:
    _require_same_disk(options, state, device)
    mismatched = [key for key, value in description.items() if key != "identity" and state.get(key) != value]
    if mismatched:
        raise SetupConflict(
            f"an unfinished setup is recorded in {options.state_dir / journal.STATE_FILE} with other settings "
            f"({', '.join(f'{k}={state.get(k)!r}' for k in mismatched)}); run that same command again to finish it"
        )


# --- the steps ------------------------------------------------------------------------------


def _describe(options: SetupOptions, device: blockdev.BlockDevice) -> dict:
    return {
        "device": options.device,
        "dev": device.dev,
        "identity": blockdev.identity(device),
        "cryptdev": options.cryptdev,
        "vault": str(options.vault.ref) if options.vault else None,
    }


def store_in_vault(target: VaultTarget, passphrase: bytes, record: Journal) -> None:
    """Create the secret (cas=0). A refusal after an interrupted earlier write is checked by reading back."""
    interrupted_before = record.done(journal.VAULT_WRITE_STARTED)
    if target.token is None:
        raise LuksctlError("a Vault token is needed to store the passphrase: --wrapping-token-file FILE or --token-file FILE ('-' for stdin)")
    with open_keystore(target.url, target.token, wrapped=target.wrapped, ca_bundle=target.ca_bundle, timeout=target.timeout,
                       allow_http=target.allow_http) as keystore:
        try:
            capabilities: set[str] | None = keystore.capabilities(target.ref)
        except VaultDenied:
            capabilities = None  # a policy without the default one: the write itself will tell
        if target.ref.kv_version == 1 and capabilities and "read" in capabilities and not interrupted_before:
            _refuse_existing_kv1_secret(keystore, target)
        if capabilities is None or capabilities & WRITING_CAPABILITIES:
            record.record(journal.VAULT_WRITE_STARTED)
            try:
                version = keystore.write(target.ref, passphrase.decode(), cas=0)
            except (VaultWriteDenied, SecretExists):
                if not interrupted_before:
                    raise
                _confirm_earlier_write(keystore, target, passphrase, record)
            else:
                if version not in (None, 1):
                    log.warning("Vault stored the passphrase as version %s of %s, not version 1", version, target.ref)
        elif interrupted_before:
            _confirm_earlier_write(keystore, target, passphrase, record)
        else:
            raise VaultWriteDenied(
                f"the token may not write {target.ref} (its capabilities there: {', '.join(sorted(capabilities)) or 'none'}); "
                "setup changed nothing on the device"
            )
        record.record(journal.VAULT_WRITTEN)


def _refuse_existing_kv1_secret(keystore: VaultClient, target: VaultTarget) -> None:
    """KV v1 has no check-and-set: a token that may update would overwrite silently, so look first."""
    try:
        keystore.read(target.ref)
    except SecretNotFound:
        return
    raise SecretExists(f"{target.ref} already holds a secret; it was not overwritten")


def _confirm_earlier_write(keystore: VaultClient, target: VaultTarget, passphrase: bytes, record: Journal) -> None:
    """An earlier run was cut off mid-write and the path now refuses a create: whose secret is it?"""
    try:
        ours = keystore.holds(target.ref, passphrase.decode())
    except VaultDenied:
        raise SetupConflict(
            f"an earlier run was interrupted while writing the passphrase to {target.ref}, and the path now holds a secret "
            "that this token may not read. If the earlier write landed, it is ours. Run the same command again with a token "
            f"that may read the path (e.g. the dashboard's read-only wrapping token) to check. The passphrase stays in "
            f"{record.passphrase_path}; the device is untouched"
        ) from None
    if not ours:
        raise SecretExists(f"{target.ref} holds another secret, not the one setup tried to store; it was not overwritten")


def format_device(options: SetupOptions, passphrase: bytes, record: Journal) -> str:
    """luksFormat (unless a kill came after it: then the journal's passphrase opens the device), verify, UUID."""
    if not (record.done(journal.FORMAT_STARTED) and cryptsetup.is_luks(options.device) and cryptsetup.opens(options.device, passphrase)):
        check_before_format(options, record)
        record.record(journal.FORMAT_STARTED)
        cryptsetup.luks_format(options.device, passphrase, options.luks_format())
        if not cryptsetup.opens(options.device, passphrase):
            raise WrongPassphrase(f"the new LUKS header on {options.device} does not accept the passphrase just set")
    uuid = cryptsetup.luks_uuid(options.device)
    record.record(journal.FORMATTED, uuid=uuid)
    return uuid


def back_up_header(options: SetupOptions, record: Journal) -> None:
    """Back the header up as `luksctl header backup` does (checksum beside it), never replacing a backup."""
    try:
        header.write_backup(options.device, options.header_path, replace=False)
    except FileExistsError:  # not ours from an interrupted run: keep it, stop
        raise SetupConflict(f"a different header backup appeared at {options.header_path}; it was left alone") from None
    record.record(journal.HEADER_SAVED)


def write_ini(options: SetupOptions, uuid: str, passphrase: bytes, record: Journal) -> VolumeConfig:
    saved = passphrase if options.save_passphrase_locally else None
    options.ini_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomically(options.ini_path, ini_text(options, uuid, saved).encode(), mode=0o600 if saved else 0o644)
    described = load_volume_config(options.ini_path)  # what `luksctl open` will read, read the same way
    record.record(journal.INI_WRITTEN)
    return described


def open_mapper(options: SetupOptions, passphrase: bytes) -> None:
    if find_mapper_device(options.cryptdev) is None:
        volume.open_mapper(options.device, options.cryptdev, passphrase)


def make_filesystem(options: SetupOptions, described: VolumeConfig, record: Journal) -> None:
    if record.done(journal.MKFS_STARTED):  # a kill mid-mkfs left part of one: start from a clean device
        runner.run(["wipefs", "--all", described.mapper_path], timeout=120)
    record.record(journal.MKFS_STARTED)
    runner.run([f"mkfs.{options.filesystem}", described.mapper_path], timeout=MKFS_TIMEOUT)
    record.record(journal.MKFS_DONE)


def mount_options() -> str:
    """What `luksctl open` mounts with too: config.json's MOUNT_OPTIONS (default nosuid,nodev)."""
    return load_json_config(FrontendConfig, API_CONFIG, root_owned=True, missing_ok=True).MOUNT_OPTIONS


def write_success(success: tuple[Path, str]) -> None:
    path, text = success
    write_atomically(path, text.encode(), mode=0o644)


# --- the command ----------------------------------------------------------------------------


def plan(options: SetupOptions, resumed_steps: list[str]) -> list[str]:
    vault = f"store the passphrase at {options.vault.ref} on {options.vault.url} (create only)" if options.vault else None
    steps = [
        f"save the passphrase to {options.state_dir / journal.PASSPHRASE_FILE} (root, 0600) until the end",
        vault,
        f"format {options.device}: " + " ".join(options.luks_format().argv(options.device)[1:]),
        f"back up the LUKS header to {options.header_path} (0600)",
        f"describe the volume in {options.ini_path}",
        f"open it as /dev/mapper/{options.cryptdev}",
        f"zero /dev/mapper/{options.cryptdev}" if options.wipe else None,
        f"make a {options.filesystem} filesystem",
        f"mount it on {options.mountpoint}",
        f"write {ENCRYPTION_SUCCESS[0]} and {VOLUME_SUCCESS[0]}",
        "delete the saved passphrase",
    ]
    plan = [step for step in steps if step]
    if resumed_steps:
        plan.insert(0, f"resume the unfinished setup (done: {', '.join(resumed_steps)})")
    return plan


def run_setup(options: SetupOptions, progress: Progress) -> SetupReport:
    """Called with the setup lock held, as root."""
    validate_names(options)
    device = blockdev.block_device(options.device)
    record = Journal(options.state_dir)
    state = record.load()
    if state is None:
        existing = already_set_up(options)
        if existing is not None:
            mounted = volume_status(existing.cryptdev, existing.mountpoint).mounted
            return SetupReport("mounted" if mounted else "unmounted", options.device, existing.uuid, changed=False)
    else:
        check_resume(options, state, device, _describe(options, device))
    check_device(options, device, record if state else None)
    if options.dry_run:
        return SetupReport("unavailable", options.device, plan=plan(options, state["steps"] if state else []))

    if state is None:
        passphrase = options.passphrase or generate_passphrase(options.passphrase_length)
        record.begin(passphrase, _describe(options, device))
        progress.step("passphrase", f"passphrase saved to {record.passphrase_path} until setup completes")
    else:
        passphrase = record.passphrase()
        if options.passphrase is not None and options.passphrase != passphrase:
            raise SetupConflict(f"the unfinished setup uses the passphrase saved in {record.passphrase_path}, not the one given now")
        progress.step("resume", f"resuming the unfinished setup of {options.device} (done: {', '.join(state['steps']) or 'nothing'})")

    if options.vault is not None and not record.done(journal.VAULT_WRITTEN):
        progress.step("vault", f"storing the passphrase at {options.vault.ref}")
        try:
            progress.timed("vault", lambda: store_in_vault(options.vault, passphrase, record))
        except (VaultWriteDenied, SecretExists):
            if not record.done(journal.FORMAT_STARTED):  # Vault said no and the device is untouched: forget it all
                record.finish()
            raise

    uuid = record.state.get("uuid")
    if not record.done(journal.FORMATTED):
        progress.step("format", f"formatting {options.device} (LUKS2, {options.cipher}, {options.key_size}-bit key)")
        uuid = progress.timed("format", lambda: format_device(options, passphrase, record))
    if not record.done(journal.HEADER_SAVED):
        back_up_header(options, record)
    described = write_ini(options, uuid, passphrase, record) if not record.done(journal.INI_WRITTEN) else load_volume_config(options.ini_path)
    write_success(ENCRYPTION_SUCCESS)
    progress.step("encrypted", "LUKS encryption completed")

    open_mapper(options, passphrase)
    if options.wipe and not record.done(journal.WIPED):
        progress.step("wipe", f"zeroing {described.mapper_path}")
        progress.timed("wipe", lambda: blockdev.zero_device(described.mapper_path, progress.wiped))
        record.record(journal.WIPED)
    if not record.done(journal.MKFS_DONE):
        progress.step("mkfs", f"making a {options.filesystem} filesystem on {described.mapper_path}")
        progress.timed("mkfs", lambda: make_filesystem(options, described, record))
    if not volume.current_status(described).mounted:
        volume.mount(described, mount_options())
    write_success(VOLUME_SUCCESS)
    record.finish()
    progress.step("done", "Volume setup completed")
    return SetupReport("mounted", options.device, uuid, changed=True, resumed=state is not None, seconds=progress.timings)
