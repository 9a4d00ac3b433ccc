"""The only module that speaks cryptsetup's language: its argv, its exit codes, its luksDump.

Callers speak in volume terms (open this device, which keyslot does this passphrase
open, back the header up to this file) and get answers or luksctl errors back; no other
module builds a cryptsetup argv (a test greps for one). Processes start in runner.py.

Passphrases reach cryptsetup only on stdin (`--key-file=-`). When a command needs two
of them (the one that authorises, and the new one), both go on stdin: the first exactly
`--keyfile-size` bytes long, the second up to a newline, which is how cryptsetup reads a
passphrase from a stdin that is not a terminal. So a new key must not contain a newline.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import runner
from ..errors import CommandFailed, DeviceNotFound, Refused, VolumeBusy, WrongPassphrase
from .blockdev import size_in_bytes

BINARY = "cryptsetup"
PBKDF_CHOICES = ("argon2id", "argon2i", "pbkdf2")
DEFAULT_HEADER_BACKUP = Path("/etc/luks/luks-header.bck")  # PROTOCOL §7: fast-luks' default header_path
RECOVERY_TOKEN = "luksctl-recovery"  # LUKS2 token type that labels the recovery key's keyslot
# What a started re-encryption writes into the LUKS2 requirements until it is done ("-v2" since 2.2.1):
# cryptsetup's own resilience data, which a re-run resumes from.
REENCRYPT_REQUIREMENT = "online-reencrypt"

# The PBKDF costs ~2 s by design on a fast machine; slow VMs take many times that.
KEY_TIMEOUT = 150
FORMAT_TIMEOUT = 900  # argon2id wants ~2 s and 1 GiB to benchmark and to verify; slow VMs take many times that
HEADER_TIMEOUT = 60  # commands that run no PBKDF
# A re-encryption reads and writes the whole device: its deadline grows with the size, at a rate far
# below any disk's (slow VMs under emulation included), never under the time the PBKDFs take.
REENCRYPT_SLOWEST_RATE = 1 << 20  # bytes per second

# cryptsetup(8) EXIT STATUS
NO_KEY = 2  # "no permission (bad passphrase)": no keyslot opens with the key given
BUSY = 5  # "device already exists or device is busy"


@dataclass(frozen=True)
class Pbkdf:
    """The cost of new keyslots; None leaves cryptsetup's own defaults (argon2id, ~2 s)."""

    kind: str | None = None
    iter_time_ms: int | None = None
    force_iterations: int | None = None  # a fixed cost instead of a benchmark (tests)

    def argv(self) -> list[str]:
        args = []
        if self.kind:
            args += ["--pbkdf", self.kind]
        if self.iter_time_ms is not None:
            args += ["--iter-time", str(self.iter_time_ms)]
        if self.force_iterations is not None:
            args += ["--pbkdf-force-iterations", str(self.force_iterations)]
        return args


@dataclass(frozen=True)
class Format:
    """What luksFormat makes: always LUKS2."""

    cipher: str
    key_size: int
    hash: str
    pbkdf: Pbkdf

    def argv(self, device: str) -> list[str]:
        return [BINARY, "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", self.cipher,
                "--key-size", str(self.key_size), "--hash", self.hash, *self.pbkdf.argv(), "--key-file=-", device]


@dataclass(frozen=True)
class Keyslot:
    slot: int
    pbkdf: str
    cost: dict[str, int]  # pbkdf2: iterations; argon2*: time, memory (KiB), cpus


@dataclass(frozen=True)
class LuksHeader:
    version: int
    uuid: str
    cipher: str
    key_size: int  # bits
    keyslots: dict[int, Keyslot]
    recovery_tokens: dict[int, list[int]]  # LUKS2 token id -> the keyslots it labels as recovery keys
    reencrypting: bool = False  # a re-encryption was started and has not finished (LUKS2 requirement)
    volume_key_digest: str = ""  # LUKS2: the digest of the key the data segment is encrypted with; a new key, a new digest

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


def _run(args: list[str], *, timeout: float, stdin: bytes | None = None) -> runner.Result:
    return runner.run([BINARY, *args], stdin=stdin, timeout=timeout, check=False)


def _checked(args: list[str], what: str, *, timeout: float = HEADER_TIMEOUT, stdin: bytes | None = None) -> runner.Result:
    result = _run(args, timeout=timeout, stdin=stdin)
    if result.returncode != 0:
        raise _failed(what, result)
    return result


def _failed(what: str, result: runner.Result) -> CommandFailed:
    return CommandFailed(f"cryptsetup could not {what}", result.argv, result.returncode, result.stderr)


def require_device(device: str) -> None:
    if not os.path.exists(device):
        raise DeviceNotFound(f"LUKS device {device} (uuid from the ini file) is not attached")


# --- the mapping ----------------------------------------------------------------------------


def luks_format(device: str, passphrase: bytes, spec: Format) -> None:
    _checked(spec.argv(device)[1:], f"format {device}", timeout=FORMAT_TIMEOUT, stdin=passphrase)


def open_mapper(device: str, name: str, passphrase: bytes, *, on_wrong_key: str) -> None:
    """Map `device` as /dev/mapper/`name`; `on_wrong_key` tells the operator what a refusal left."""
    result = _run(["open", device, name, "--key-file=-"], stdin=passphrase, timeout=KEY_TIMEOUT)
    if result.returncode == NO_KEY:
        raise WrongPassphrase(f"the passphrase does not open {device}; {on_wrong_key}")
    if result.returncode != 0:
        raise _failed(f"open {device}", result)


def close_mapper(name: str) -> None:
    result = _run(["close", name], timeout=KEY_TIMEOUT)
    if result.returncode == BUSY:
        raise VolumeBusy(f"/dev/mapper/{name} is still in use (mounted elsewhere?); it stays open")
    if result.returncode != 0:
        raise _failed(f"close {name}", result)


# --- passphrases and keyslots ---------------------------------------------------------------


def _test_passphrase(device: str, passphrase: bytes, slot: int | None) -> runner.Result | None:
    """The answer of `open --test-passphrase` (maps nothing), or None for a passphrase that opens no slot."""
    only = ["--key-slot", str(slot)] if slot is not None else []
    result = _run(["open", "--test-passphrase", "--verbose", *only, "--key-file=-", device], stdin=passphrase, timeout=KEY_TIMEOUT)
    if result.returncode == NO_KEY:
        return None
    if result.returncode != 0:
        raise _failed(f"test a passphrase on {device}", result)
    return result


def opens(device: str, passphrase: bytes) -> bool:
    return _test_passphrase(device, passphrase, None) is not None


def opening_slot(device: str, passphrase: bytes, slot: int | None = None) -> int | None:
    """The keyslot `passphrase` opens (only `slot`, if given), or None."""
    result = _test_passphrase(device, passphrase, slot)
    if result is None:
        return None
    match = re.search(r"Key slot (\d+) unlocked", result.stdout + result.stderr)
    if not match:
        raise CommandFailed(f"cryptsetup did not say which keyslot of {device} opened", result.argv, result.returncode, result.stderr)
    return int(match.group(1))


def add_key(device: str, authorising: bytes, new_key: bytes, slot: int, pbkdf: Pbkdf) -> None:
    if b"\n" in new_key:
        raise ValueError("a new key must not contain a newline")  # ours never do: see the module docstring
    args = ["luksAddKey", "--key-file=-", f"--keyfile-size={len(authorising)}", "--key-slot", str(slot), *pbkdf.argv(), device]
    result = _run(args, stdin=authorising + new_key + b"\n", timeout=KEY_TIMEOUT)
    if result.returncode == NO_KEY:
        raise WrongPassphrase(f"the passphrase given does not open {device}; nothing was changed")
    if result.returncode != 0:
        raise _failed(f"add a key to slot {slot} of {device}", result)


def kill_slot(device: str, slot: int, remaining: bytes) -> None:
    """Wipe `slot`; cryptsetup itself checks that `remaining` opens another slot."""
    if not remaining:  # an empty key file: cryptsetup then kills the slot without checking anything
        raise Refused(f"no passphrase of another keyslot of {device} was given; slot {slot} was kept")
    result = _run(["luksKillSlot", "--key-file=-", device, str(slot)], stdin=remaining, timeout=KEY_TIMEOUT)
    if result.returncode == NO_KEY:
        raise Refused(f"the passphrase given opens no keyslot of {device} other than {slot}; slot {slot} was kept")
    if result.returncode != 0:
        raise _failed(f"remove keyslot {slot} of {device}", result)


def import_token(device: str, token: dict) -> None:
    _checked(["token", "import", "--json-file=-", device], f"label a keyslot of {device}", stdin=json.dumps(token).encode())


def remove_token(device: str, token_id: int) -> None:
    _checked(["token", "remove", "--token-id", str(token_id), device], f"remove token {token_id} of {device}")


def erase(device: str) -> None:
    """Wipe every keyslot: nothing opens the volume again, except a header backup."""
    _checked(["luksErase", "--batch-mode", device], f"erase the keyslots of {device}")


# --- the header -----------------------------------------------------------------------------


def is_luks(device: str) -> bool:
    return _run(["isLuks", device], timeout=HEADER_TIMEOUT).returncode == 0


def luks_uuid(device: str | Path) -> str:
    return _checked(["luksUUID", str(device)], f"read the LUKS uuid of {device}").stdout.strip()


def read_header(device: str | Path) -> LuksHeader:
    """luksDump of a device or a header backup file: LUKS2 as JSON, LUKS1 from its text."""
    uuid = luks_uuid(device)
    result = _run(["luksDump", "--dump-json-metadata", str(device)], timeout=HEADER_TIMEOUT)
    if result.returncode == 0:
        return _parse_luks2(uuid, json.loads(result.stdout))
    text = _checked(["luksDump", str(device)], f"dump the header of {device}").stdout
    if not re.search(r"^Version:\s*1\s*$", text, re.MULTILINE):
        raise _failed(f"dump the LUKS2 metadata of {device}", result)
    return _parse_luks1(uuid, text)


def _parse_luks2(uuid: str, metadata: dict) -> LuksHeader:
    keyslots = {}
    passphrase_slots = {slot: info for slot, info in metadata["keyslots"].items() if info.get("type") == "luks2"}
    for slot, info in passphrase_slots.items():  # not a re-encryption's own (type "reencrypt": no passphrase)
        kdf = info["kdf"]
        cost_keys = ("iterations",) if kdf["type"] == "pbkdf2" else ("time", "memory", "cpus")
        cost = {key: int(kdf[key]) for key in cost_keys if key in kdf}
        keyslots[int(slot)] = Keyslot(int(slot), kdf["type"], cost)
    segment = metadata["segments"].get("0", {})
    key_size = next(iter(passphrase_slots.values()), {}).get("key_size", 0) * 8
    tokens = {
        int(token_id): [int(slot) for slot in token.get("keyslots", [])]
        for token_id, token in metadata.get("tokens", {}).items()
        if token.get("type") == RECOVERY_TOKEN
    }
    requirements = metadata.get("config", {}).get("requirements", {}).get("mandatory", [])
    reencrypting = any(requirement.startswith(REENCRYPT_REQUIREMENT) for requirement in requirements)
    digest = next((digest["digest"] for digest in metadata.get("digests", {}).values() if "0" in digest.get("segments", [])), "")
    return LuksHeader(2, uuid, segment.get("encryption", "unknown"), key_size, keyslots, tokens, reencrypting, digest)


def _parse_luks1(uuid: str, text: str) -> LuksHeader:
    def field(name: str) -> str:
        match = re.search(rf"^{name}:\s*(.+?)\s*$", text, re.MULTILINE)
        return match.group(1) if match else ""

    keyslots = {}
    for match in re.finditer(r"^Key Slot (\d+): ENABLED\n\s*Iterations:\s*(\d+)\n", text, re.MULTILINE):
        slot = int(match.group(1))
        keyslots[slot] = Keyslot(slot, "pbkdf2", {"iterations": int(match.group(2))})
    cipher = "-".join(part for part in (field("Cipher name"), field("Cipher mode")) if part)
    return LuksHeader(1, uuid, cipher, int(field("MK bits") or 0), keyslots, {})


def backup_header(device: str, target: Path) -> None:
    """Copy the header to `target`, which must not exist (cryptsetup refuses to overwrite)."""
    _checked(["luksHeaderBackup", device, "--header-backup-file", str(target)], f"back up the header of {device}")


def restore_header(device: str, backup: Path) -> None:
    _checked(["luksHeaderRestore", device, "--header-backup-file", str(backup), "--batch-mode"], f"restore the header of {device}")


# --- re-encryption --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reencryption:
    """One `cryptsetup reencrypt` run: online through `active_name` (the open mapping) or offline."""

    device: str
    active_name: str | None
    on_progress: Callable[[dict], None] | None = None  # cryptsetup's --progress-json lines; None: its bar on our stdout

    def target(self) -> list[str]:
        if self.active_name:
            return ["--active-name", self.active_name]
        if not stat.S_ISBLK(os.stat(self.device).st_mode):
            # An image file (the host tests): cryptsetup cannot look for a mapping of it, and refuses
            # unless told it is offline. A block device is checked by cryptsetup itself.
            return ["--force-offline-reencrypt", self.device]
        return [self.device]

    def run(self, args: list[str], stdin: bytes, what: str) -> None:
        progress = ["--progress-json"] if self.on_progress else []
        result = runner.run_streaming([BINARY, "reencrypt", *args, *progress, *self.target()], stdin=stdin,
                                      on_line=self._progress_line if self.on_progress else None,
                                      timeout=KEY_TIMEOUT + size_in_bytes(self.device) / REENCRYPT_SLOWEST_RATE)
        if result.returncode == NO_KEY:
            raise WrongPassphrase(f"the passphrase given does not open {self.device}; nothing was changed")
        if result.returncode != 0:
            raise _failed(f"{what} {self.device}", result)

    def _progress_line(self, line: str) -> None:
        if line.startswith("{"):  # the JSON lines; cryptsetup may print a plain message too
            self.on_progress(json.loads(line))


def start_reencryption(job: Reencryption, passphrases: list[bytes], *, keep_only_slot: int | None,
                       cipher: str | None, key_size: int | None, pbkdf: Pbkdf) -> None:
    """A new volume key for the whole device.

    keep_only_slot: that keyslot's passphrase (the only one given) opens the new key, and every
    other keyslot is removed. Otherwise `passphrases` are those of every keyslot, in slot order:
    cryptsetup asks for each, one line each from a stdin that is not a terminal, and keeps them all.
    """
    if keep_only_slot is not None:
        key_args, stdin = ["--key-slot", str(keep_only_slot), "--key-file=-"], passphrases[0]
    elif len(passphrases) == 1:
        key_args, stdin = ["--key-file=-"], passphrases[0]
    else:
        if any(b"\n" in passphrase for passphrase in passphrases):
            raise ValueError("passphrases sent one a line must not contain a newline")
        key_args, stdin = [], b"".join(passphrase + b"\n" for passphrase in passphrases)
    new_cipher = (["--cipher", cipher] if cipher else []) + (["--key-size", str(key_size)] if key_size else [])
    job.run(["--batch-mode", *key_args, *new_cipher, *pbkdf.argv()], stdin, "re-encrypt")


def resume_reencryption(job: Reencryption, passphrase: bytes) -> None:
    """Carry on from cryptsetup's resilience data in the header (after a kill or a power cut)."""
    job.run(["--batch-mode", "--resume-only", "--key-file=-"], passphrase, "resume the re-encryption of")
