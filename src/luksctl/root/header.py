"""The LUKS header: what it says (luksDump), and its backup file (write, verify, restore).

A header backup opens the volume with every passphrase its keyslots held when it was
taken, so a backup is only as safe as its oldest keyslot. Backups are byte copies
made by `cryptsetup luksHeaderBackup`, which are identical for an unchanged header:
comparing checksums is how `verify` tells whether a backup is current.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import runner
from ..durable import write_atomically
from ..errors import CommandFailed, DeviceNotFound, Refused

DEFAULT_BACKUP = Path("/etc/luks/luks-header.bck")  # PROTOCOL §7: fast-luks' default header_path
HEADER_TIMEOUT = 60  # header commands run no PBKDF
RECOVERY_TOKEN = "luksctl-recovery"  # LUKS2 token type that labels the recovery key's keyslot


@dataclass(frozen=True)
class Keyslot:
    slot: int
    pbkdf: str
    cost: dict[str, int]  # pbkdf2: iterations; argon2*: time, memory (KiB), cpus
    fingerprint: str  # changes whenever the slot is rewritten (its salt)


@dataclass(frozen=True)
class LuksHeader:
    version: int
    uuid: str
    cipher: str
    key_size: int  # bits
    keyslots: dict[int, Keyslot]
    recovery_tokens: dict[int, list[int]]  # LUKS2 token id -> the keyslots it labels as recovery keys

    @property
    def recovery_slots(self) -> set[int]:
        return {slot for slots in self.recovery_tokens.values() for slot in slots if slot in self.keyslots}

    @property
    def max_keyslots(self) -> int:
        return 32 if self.version == 2 else 8

    def free_slot(self) -> int:
        for slot in range(self.max_keyslots):
            if slot not in self.keyslots:
                return slot
        raise Refused(f"all {self.max_keyslots} keyslots are in use; remove one first")


def require_device(device: str) -> None:
    if not os.path.exists(device):
        raise DeviceNotFound(f"LUKS device {device} (uuid from the ini file) is not attached")


def read_header(device: str | Path) -> LuksHeader:
    """luksDump of a device or a header backup file: LUKS2 as JSON, LUKS1 from its text."""
    uuid = runner.run(["cryptsetup", "luksUUID", str(device)], timeout=HEADER_TIMEOUT).stdout.strip()
    result = runner.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(device)], timeout=HEADER_TIMEOUT, check=False)
    if result.returncode == 0:
        return _parse_luks2(uuid, json.loads(result.stdout))
    text = runner.run(["cryptsetup", "luksDump", str(device)], timeout=HEADER_TIMEOUT).stdout
    if not re.search(r"^Version:\s*1\s*$", text, re.MULTILINE):
        raise CommandFailed(f"cryptsetup cannot dump the LUKS2 metadata of {device}", result.argv, result.returncode, result.stderr)
    return _parse_luks1(uuid, text)


def _parse_luks2(uuid: str, metadata: dict) -> LuksHeader:
    keyslots = {}
    for slot, info in metadata["keyslots"].items():
        kdf = info["kdf"]
        cost_keys = ("iterations",) if kdf["type"] == "pbkdf2" else ("time", "memory", "cpus")
        cost = {key: int(kdf[key]) for key in cost_keys if key in kdf}
        keyslots[int(slot)] = Keyslot(int(slot), kdf["type"], cost, kdf.get("salt", ""))
    segment = metadata["segments"].get("0", {})
    key_size = next(iter(metadata["keyslots"].values()), {}).get("key_size", 0) * 8
    tokens = {
        int(token_id): [int(slot) for slot in token.get("keyslots", [])]
        for token_id, token in metadata.get("tokens", {}).items()
        if token.get("type") == RECOVERY_TOKEN
    }
    return LuksHeader(2, uuid, segment.get("encryption", "unknown"), key_size, keyslots, tokens)


def _parse_luks1(uuid: str, text: str) -> LuksHeader:
    def field(name: str) -> str:
        match = re.search(rf"^{name}:\s*(.+?)\s*$", text, re.MULTILINE)
        return match.group(1) if match else ""

    keyslots = {}
    for match in re.finditer(r"^Key Slot (\d+): ENABLED\n\s*Iterations:\s*(\d+)\n\s*Salt:\s*((?:[0-9a-f ]+\n?\s*)+?)\s*Key material", text, re.MULTILINE):
        slot = int(match.group(1))
        keyslots[slot] = Keyslot(slot, "pbkdf2", {"iterations": int(match.group(2))}, "".join(match.group(3).split()))
    cipher = "-".join(part for part in (field("Cipher name"), field("Cipher mode")) if part)
    return LuksHeader(1, uuid, cipher, int(field("MK bits") or 0), keyslots, {})


def backup_path(configured: str | None) -> Path:
    return Path(configured) if configured else DEFAULT_BACKUP


def checksum_path(backup: Path) -> Path:
    """The sidecar `<backup>.sha256`, in `sha256sum -c` format."""
    return backup.with_name(backup.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_checksum(backup: Path) -> str | None:
    try:
        return checksum_path(backup).read_text().split()[0]
    except (FileNotFoundError, IndexError):
        return None


@contextmanager
def _private_dir(near: Path) -> Iterator[Path]:
    """A 0700 scratch directory beside `near`, for header copies (they open the volume)."""
    near.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".luksctl-", dir=near.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy_header(device: str, target: Path) -> str:
    runner.run(["cryptsetup", "luksHeaderBackup", device, "--header-backup-file", str(target)], timeout=HEADER_TIMEOUT)
    return sha256_of(target)


def current_checksum(device: str, near: Path) -> str:
    """Checksum of the device's header now, as a backup taken now would have it."""
    with _private_dir(near) as scratch:
        return _copy_header(device, scratch / "header")


def write_backup(device: str, backup: Path, *, replace: bool = True) -> str:
    """Replace `backup` with the device's header (0600) and record its checksum beside it.

    Each file is replaced whole or not at all (durable.write_atomically). A crash between
    the two leaves a checksum that no longer matches: `verify` says so, a re-run fixes it.
    replace=False (setup) never replaces an existing backup: one identical to the header now
    (an interrupted run's) is kept, any other raises FileExistsError.
    """
    with _private_dir(backup) as scratch:
        copy = scratch / "header"
        checksum = _copy_header(device, copy)
        data = copy.read_bytes()
    try:
        write_atomically(backup, data, mode=0o600, replace=replace)
    except FileExistsError:
        if backup.read_bytes() != data:
            raise
    write_atomically(checksum_path(backup), f"{checksum}  {backup.name}\n".encode(), mode=0o600)
    return checksum


@dataclass(frozen=True)
class BackupCheck:
    path: str
    exists: bool
    age_seconds: float | None = None
    intact: bool | None = None  # the file still has the checksum recorded when it was written (None: none recorded)
    matches: bool | None = None  # byte-identical to the device's header now
    same_volume: bool | None = None
    keyslots_current: bool | None = None  # same keyslots, same salts: opens with exactly today's keys

    @property
    def ok(self) -> bool:
        return bool(self.exists and self.matches and self.intact is not False)


def check_backup(device: str, backup: Path, now: float) -> BackupCheck:
    if not backup.is_file():
        return BackupCheck(str(backup), exists=False)
    actual = sha256_of(backup)
    recorded = recorded_checksum(backup)
    on_device, in_backup = read_header(device), read_header(backup)
    return BackupCheck(
        str(backup),
        exists=True,
        age_seconds=round(now - backup.stat().st_mtime, 1),
        intact=None if recorded is None else recorded == actual,
        matches=current_checksum(device, backup) == actual,
        same_volume=on_device.uuid == in_backup.uuid,
        keyslots_current=on_device.keyslots == in_backup.keyslots,
    )


def check_restorable(device: str, backup: Path, expected_uuid: str) -> LuksHeader:
    """Refuse a backup of another volume, a damaged backup, or a device that is another volume."""
    if not backup.is_file():
        raise Refused(f"there is no header backup at {backup}")
    recorded = recorded_checksum(backup)
    if recorded is not None and recorded != sha256_of(backup):
        raise Refused(f"{backup} no longer matches the checksum recorded in {checksum_path(backup)}; it is damaged or was replaced")
    saved = read_header(backup)
    if saved.uuid.lower() != expected_uuid.lower():
        raise Refused(f"{backup} is the header of volume {saved.uuid}, not of this volume ({expected_uuid}); nothing was written")
    try:
        on_device = read_header(device).uuid
    except CommandFailed:
        on_device = None  # a damaged header is why one restores: the by-uuid link and the ini named it
    if on_device is not None and on_device.lower() != saved.uuid.lower():
        raise Refused(f"{device} holds volume {on_device}, not {saved.uuid}; nothing was written")
    return saved


def restore_backup(device: str, backup: Path) -> None:
    runner.run(["cryptsetup", "luksHeaderRestore", device, "--header-backup-file", str(backup), "--batch-mode"], timeout=HEADER_TIMEOUT)


def describe(header: LuksHeader) -> dict:
    """The header as the report shows it (no salts: they mean nothing to an operator)."""
    return {
        "luks_version": header.version,
        "uuid": header.uuid,
        "cipher": header.cipher,
        "key_size": header.key_size,
        "keyslots": [
            {"slot": slot.slot, "pbkdf": slot.pbkdf, **slot.cost, "recovery_key": slot.slot in header.recovery_slots}
            for slot in sorted(header.keyslots.values(), key=lambda s: s.slot)
        ],
    }

