"""The recovery key, and which keyslot a passphrase must open before a key changes.

The keyslot operations themselves (test a passphrase, add a key, kill a slot) are
cryptsetup's and live in cryptsetup.py; this module decides which ones to run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..errors import CommandFailed, Refused, WrongPassphrase
from .cryptsetup import RECOVERY_TOKEN, Pbkdf, add_key, import_token, kill_slot, opening_slot, read_header, remove_token

# 48 characters from 31 unambiguous ones (no 0/o, 1/l/i): 237 bits, easy to read aloud.
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
RECOVERY_GROUPS, RECOVERY_GROUP_LENGTH = 8, 6


def new_recovery_key() -> bytes:
    groups = ("".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_GROUP_LENGTH)) for _ in range(RECOVERY_GROUPS))
    return "-".join(groups).encode()


def require_slot(device: str, passphrase: bytes, what: str) -> int:
    slot = opening_slot(device, passphrase)
    if slot is None:
        raise WrongPassphrase(f"{what} does not open {device}; nothing was changed")
    return slot


def label_recovery_slot(device: str, slot: int) -> None:
    import_token(device, {"type": RECOVERY_TOKEN, "keyslots": [str(slot)]})


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
        write_new_file(output, key)  # no newline: `cryptsetup --key-file FILE` would take it as part of the key
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

