"""`luksctl rotate`: a new passphrase for the volume, stored as a new version in Vault.

The order keeps, at every instant, a passphrase that both opens the volume and can be
read back from Vault, and a copy of the new one on disk until it is in Vault:

1. save the new passphrase and the slots (one pending file, root, 0600) before anything depends on it;
2. luksAddKey it into a free keyslot, authorised by the passphrase Vault holds now;
3. check with --test-passphrase that it opens that keyslot;
4. write it to Vault (KV v2: cas = the version read, so a concurrent change is refused);
5. luksKillSlot the old keyslot (cryptsetup itself checks the new passphrase opens another);
6. write a fresh header backup: the old one still opens with the old passphrase;
7. delete the pending file.

Vault is the source of truth on a re-run: if it already holds the pending passphrase,
step 4 happened. Each step checks whether it is done, so a re-run after a kill, a power
loss or a Vault failure resumes where the first run stopped. The pending passphrase and
its slots are one file (pending.py), so no kill leaves one without the other; the
two-file form of earlier versions is still read, and its slots worked out again from the
device and Vault when a kill left only the passphrase.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Refused, VaultDenied
from ..vault import SecretRef, VaultClient
from .cryptsetup import LuksHeader, Pbkdf, add_key, kill_slot, opening_slot, read_header
from .header import write_backup
from .pending import OLD_ROTATE_PASSPHRASE, OLD_ROTATE_STATE, ROTATION, PendingStore
from .setup import generate_passphrase

PASSPHRASE_LENGTH = 64
ROTATING_CAPABILITIES = ({"read", "update"}, {"root"}, {"sudo"})


@dataclass
class Rotation:
    new_slot: int
    removed_slot: int | None
    vault_version: int | None
    resumed: bool
    steps: list[str] = field(default_factory=list)


class Pending:
    """The unfinished rotation: its passphrase and the keyslots it adds and replaces."""

    def __init__(self, directory: Path) -> None:
        self.store = PendingStore(directory, "rotate")

    def load(self) -> tuple[bytes, dict | None] | None:
        """(passphrase, {"old_slot", "new_slot"} or None if only an old-form passphrase is left), or None."""
        text = self.store.read(ROTATION)
        if text is not None:
            try:
                saved = json.loads(text)
                return saved.pop("passphrase").encode(), saved
            except (ValueError, KeyError, AttributeError, TypeError):  # TypeError: a JSON list
                raise Refused(f"{self.store.path(ROTATION)} is damaged; compare it with the device, then move it away") from None
        passphrase = self.store.read(OLD_ROTATE_PASSPHRASE)
        if passphrase is None:
            return None
        try:
            state = json.loads(self.store.read(OLD_ROTATE_STATE) or b"")
        except ValueError:
            state = None  # killed between the two files: rotate() works the slots out again
        return passphrase, state

    def save(self, passphrase: bytes, state: dict) -> None:
        """One atomic write, then the old form goes: a kill in between leaves both, and the new one wins."""
        self.store.write(ROTATION, json.dumps({"passphrase": passphrase.decode(), **state}).encode() + b"\n")
        self.store.remove(OLD_ROTATE_PASSPHRASE, OLD_ROTATE_STATE)

    def remove(self) -> None:
        self.store.remove(ROTATION, OLD_ROTATE_PASSPHRASE, OLD_ROTATE_STATE)


def check_capabilities(keystore: VaultClient, ref: SecretRef) -> None:
    try:
        capabilities = keystore.capabilities(ref)
    except VaultDenied:
        return  # a policy without the default one cannot ask: the read or the write will tell
    if not any(needed <= capabilities for needed in ROTATING_CAPABILITIES):
        raise VaultDenied(
            f"rotation needs read and update on {ref}; this token has {', '.join(sorted(capabilities)) or 'nothing'} there "
            "(the dashboard's tokens are create-only or read-only); nothing was changed"
        )


def _opens_slot(device: str, passphrase: bytes, slot: int) -> bool:
    # cryptsetup fails (not "wrong passphrase") on --key-slot of an empty slot: look first.
    return slot in read_header(device).keyslots and opening_slot(device, passphrase, slot) == slot


def _current_slots(device: str, in_vault: bytes, ref: SecretRef) -> tuple[int, LuksHeader]:
    """The keyslot Vault's passphrase opens, and the header: refused if that is nothing or the recovery key."""
    old_slot = opening_slot(device, in_vault)
    if old_slot is None:
        raise Refused(f"the passphrase in Vault at {ref} does not open {device}; nothing was changed")
    header = read_header(device)
    if old_slot in header.recovery_slots:
        raise Refused(f"the passphrase in Vault at {ref} is the recovery key (keyslot {old_slot}); nothing was changed")
    return old_slot, header


def rotate(device: str, keystore: VaultClient, ref: SecretRef, state_dir: Path, backup: Path, pbkdf: Pbkdf) -> Rotation:
    check_capabilities(keystore, ref)
    stored = keystore.read(ref)
    in_vault = stored.value.encode()
    pending = Pending(state_dir)
    loaded = pending.load()
    resumed = loaded is not None
    if loaded is None:
        old_slot, header = _current_slots(device, in_vault, ref)
        new, state = generate_passphrase(PASSPHRASE_LENGTH), {"old_slot": old_slot, "new_slot": header.free_slot()}
        pending.save(new, state)
    else:
        new, state = loaded
        if state is None:  # an old-form passphrase without its state: saved before luksAddKey, so Vault holds the old one
            if in_vault == new:
                raise Refused(f"Vault holds the pending passphrase of {state_dir / OLD_ROTATE_PASSPHRASE} but its rotation state is gone; "
                              "compare it with the device, then move it away")
            old_slot, header = _current_slots(device, in_vault, ref)
            new_slot = opening_slot(device, new)
            state = {"old_slot": old_slot, "new_slot": header.free_slot() if new_slot is None else new_slot}
            pending.save(new, state)
    rotation = Rotation(state["new_slot"], None, stored.version, resumed)
    already_in_vault = in_vault == new

    if not _opens_slot(device, new, state["new_slot"]):
        if already_in_vault:
            raise Refused(f"Vault holds the pending passphrase but it opens no keyslot of {device}; keep {state_dir / ROTATION} and restore the header backup")
        add_key(device, in_vault, new, state["new_slot"], pbkdf)
        rotation.steps.append("added new keyslot")
        if not _opens_slot(device, new, state["new_slot"]):
            raise Refused(f"the new passphrase does not open keyslot {state['new_slot']} of {device} after luksAddKey; the old one still does")

    if not already_in_vault:
        cas = stored.version if ref.kv_version == 2 else None
        rotation.vault_version = keystore.write(ref, new.decode(), cas=cas)
        rotation.steps.append("stored in Vault")

    if state["old_slot"] != state["new_slot"] and state["old_slot"] in read_header(device).keyslots:
        kill_slot(device, state["old_slot"], new)
        rotation.removed_slot = state["old_slot"]
        rotation.steps.append("removed old keyslot")

    write_backup(device, backup)
    rotation.steps.append("wrote header backup")
    pending.remove()
    return rotation
