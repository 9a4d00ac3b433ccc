"""Keyslots: which one a passphrase opens, adding and removing keys, the recovery key.

Passphrases reach cryptsetup only on stdin. When a command needs two of them (the
one that authorises, and the new one), both go on stdin: the first exactly
`--keyfile-size` bytes long, the second up to a newline, which is how cryptsetup
reads a passphrase from a stdin that is not a terminal. So a new key must not
contain a newline (ours never do).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from .. import runner
from ..errors import CommandFailed, Refused, WrongPassphrase
from .header import HEADER_TIMEOUT, RECOVERY_TOKEN, read_header
from .volume import CRYPTSETUP_NO_KEY, CRYPTSETUP_TIMEOUT

# 48 characters from 31 unambiguous ones (no 0/o, 1/l/i): 237 bits, easy to read aloud.
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
RECOVERY_GROUPS, RECOVERY_GROUP_LENGTH = 8, 6


@dataclass(frozen=True)
class Pbkdf:
    """The cost of new keyslots; None leaves cryptsetup's own defaults (argon2id, ~2 s)."""

    kind: str | None = None
    iter_time_ms: int | None = None

    def argv(self) -> list[str]:
        args = []
        if self.kind:
            args += ["--pbkdf", self.kind]
        if self.iter_time_ms:
            args += ["--iter-time", str(self.iter_time_ms)]
        return args


def new_recovery_key() -> bytes:
    groups = ("".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_GROUP_LENGTH)) for _ in range(RECOVERY_GROUPS))
    return "-".join(groups).encode()


def opening_slot(device: str, passphrase: bytes, slot: int | None = None) -> int | None:
    """The keyslot `passphrase` opens (only `slot`, if given), or None."""
    argv = ["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-file=-", device]
    if slot is not None:
        argv[4:4] = ["--key-slot", str(slot)]
    result = runner.run(argv, stdin=passphrase, timeout=CRYPTSETUP_TIMEOUT, check=False)
    if result.returncode == CRYPTSETUP_NO_KEY:
        return None
    if result.returncode != 0:
        raise CommandFailed(f"cryptsetup could not test a passphrase on {device}", result.argv, result.returncode, result.stderr)
    match = re.search(r"Key slot (\d+) unlocked", result.stdout + result.stderr)
    if not match:
        raise CommandFailed(f"cryptsetup did not say which keyslot of {device} opened", result.argv, result.returncode, result.stderr)
    return int(match.group(1))


def require_slot(device: str, passphrase: bytes, what: str) -> int:
    slot = opening_slot(device, passphrase)
    if slot is None:
        raise WrongPassphrase(f"{what} does not open {device}; nothing was changed")
    return slot


def add_key(device: str, authorising: bytes, new_key: bytes, slot: int, pbkdf: Pbkdf) -> None:
    if b"\n" in new_key:
        raise ValueError("a new key must not contain a newline")  # ours never do: see the module docstring
    argv = ["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(authorising)}", "--key-slot", str(slot), *pbkdf.argv(), device]
    result = runner.run(argv, stdin=authorising + new_key + b"\n", timeout=CRYPTSETUP_TIMEOUT, check=False)
    if result.returncode == CRYPTSETUP_NO_KEY:
        raise WrongPassphrase(f"the passphrase given does not open {device}; nothing was changed")
    if result.returncode != 0:
        raise CommandFailed(f"cryptsetup could not add a key to slot {slot} of {device}", result.argv, result.returncode, result.stderr)


def kill_slot(device: str, slot: int, remaining: bytes) -> None:
    """Wipe `slot`; cryptsetup itself checks that `remaining` opens another slot."""
    argv = ["cryptsetup", "luksKillSlot", "--key-file=-", device, str(slot)]
    result = runner.run(argv, stdin=remaining, timeout=CRYPTSETUP_TIMEOUT, check=False)
    if result.returncode == CRYPTSETUP_NO_KEY:
        raise Refused(f"the passphrase given opens no keyslot of {device} other than {slot}; slot {slot} was kept")
    if result.returncode != 0:
        raise CommandFailed(f"cryptsetup could not remove keyslot {slot} of {device}", result.argv, result.returncode, result.stderr)


def label_recovery_slot(device: str, slot: int) -> None:
    token = json.dumps({"type": RECOVERY_TOKEN, "keyslots": [str(slot)]}).encode()
    runner.run(["cryptsetup", "token", "import", "--json-file=-", device], stdin=token, timeout=HEADER_TIMEOUT)


def remove_token(device: str, token_id: int) -> None:
    runner.run(["cryptsetup", "token", "remove", "--token-id", str(token_id), device], timeout=HEADER_TIMEOUT)


def write_new_file(path: Path, content: bytes) -> None:
    """0600, never over an existing file, on disk before we go on."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise Refused(f"{path} already exists; name a new file") from None
    except OSError as exc:
        raise Refused(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())


def add_recovery_key(device: str, stored: bytes, pbkdf: Pbkdf, output: Path | None) -> tuple[int, bytes]:
    """Add a recovery key in a free keyslot, labelled by a LUKS2 token; returns (slot, key).

    With `output`, the key is on disk before the keyslot exists, so a crash leaves at
    worst a file whose key opens nothing, never a keyslot whose key nobody has.
    """
    header = read_header(device)
    if header.version != 2:
        raise Refused(f"{device} is LUKS1, which cannot label a recovery keyslot; convert it first (cryptsetup convert --type luks2)")
    if header.recovery_slots:
        raise Refused(f"{device} already has a recovery key in keyslot {min(header.recovery_slots)}; remove it first")
    require_slot(device, stored, "the passphrase given")
    slot = header.free_slot()
    key = new_recovery_key()
    if output is not None:
        write_new_file(output, key + b"\n")
    add_key(device, stored, key, slot, pbkdf)
    if opening_slot(device, key, slot) != slot:
        raise CommandFailed(f"the new recovery key does not open keyslot {slot} of {device}", [], None, "")
    label_recovery_slot(device, slot)
    return slot, key


def remove_recovery_key(device: str, stored: bytes) -> list[int] | None:
    """Remove the recovery keyslot and its label: the slots removed, or None if there was no label.

    The stored passphrase must open another slot: that is what is left to open the volume.
    """
    header = read_header(device)
    if not header.recovery_tokens:
        return None
    stored_slot = require_slot(device, stored, "the passphrase given")
    if stored_slot in header.recovery_slots:
        raise Refused("the passphrase given is the recovery key itself; give the stored passphrase, which must open another keyslot")
    removed = []
    for token_id, slots in sorted(header.recovery_tokens.items()):
        for slot in slots:
            if slot in header.keyslots:
                kill_slot(device, slot, stored)
                removed.append(slot)
        remove_token(device, token_id)  # after the slot: a crash in between leaves a label a re-run finds
    return removed

