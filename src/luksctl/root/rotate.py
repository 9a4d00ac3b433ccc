"""`luksctl rotate`: a new passphrase for the volume, stored as a new version in Vault.

The order keeps, at every instant, a passphrase that both opens the volume and can be
read back from Vault, and a copy of the new one on disk until it is in Vault:

1. save the new passphrase (pending file, root, 0600) before anything depends on it;
2. luksAddKey it into a free keyslot, authorised by the passphrase Vault holds now;
3. check with --test-passphrase that it opens that keyslot;
4. write it to Vault (KV v2: cas = the version read, so a concurrent change is refused);
5. luksKillSlot the old keyslot (cryptsetup itself checks the new passphrase opens another);
6. write a fresh header backup: the old one still opens with the old passphrase;
7. delete the pending file.

Vault is the source of truth on a re-run: if it already holds the pending passphrase,
step 4 happened. Each step checks whether it is done, so a re-run after a kill, a power
loss or a Vault failure resumes where the first run stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..durable import remove_durably, write_atomically
from ..errors import Refused, VaultDenied
from ..vault import SecretRef, VaultClient
from .cryptsetup import Pbkdf, add_key, kill_slot, opening_slot, read_header
from .header import write_backup
from .journal import PASSPHRASE_FILE as SETUP_PENDING
from .setup import generate_passphrase

PENDING_PASSPHRASE = "rotate-pending-passphrase"
PENDING_STATE = "rotate-state.json"
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
    """The unfinished rotation: its passphrase and the keyslot it replaces, root-only in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.passphrase_path = directory / PENDING_PASSPHRASE
        self.state_path = directory / PENDING_STATE

    def exists(self) -> bool:
        return self.passphrase_path.exists()

    def load(self) -> tuple[bytes, dict]:
        try:
            return self.passphrase_path.read_bytes(), json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            raise Refused(f"{self.passphrase_path} exists but {self.state_path} is missing or damaged; compare them with the device, then move them away") from None

    def save(self, passphrase: bytes, state: dict) -> None:
        """The passphrase first: a state without it would name a key nobody has."""
        write_atomically(self.passphrase_path, passphrase, mode=0o600)
        write_atomically(self.state_path, json.dumps(state).encode() + b"\n", mode=0o600)

    def remove(self) -> None:
        remove_durably(self.passphrase_path)
        remove_durably(self.state_path)


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


def rotate(device: str, keystore: VaultClient, ref: SecretRef, state_dir: Path, backup: Path, pbkdf: Pbkdf) -> Rotation:
    check_capabilities(keystore, ref)
    stored = keystore.read(ref)
    in_vault = stored.value.encode()
    pending = Pending(state_dir)
    resumed = pending.exists()
    if resumed:
        new, state = pending.load()
    else:
        old_slot = opening_slot(device, in_vault)
        if old_slot is None:
            raise Refused(f"the passphrase in Vault at {ref} does not open {device}; nothing was changed")
        header = read_header(device)
        if old_slot in header.recovery_slots:
            raise Refused(f"the passphrase in Vault at {ref} is the recovery key (keyslot {old_slot}); nothing was changed")
        new, state = generate_passphrase(PASSPHRASE_LENGTH), {"old_slot": old_slot, "new_slot": header.free_slot()}
        pending.save(new, state)
    rotation = Rotation(state["new_slot"], None, stored.version, resumed)
    already_in_vault = in_vault == new

    if not _opens_slot(device, new, state["new_slot"]):
        if already_in_vault:
            raise Refused(f"Vault holds the pending passphrase but it opens no keyslot of {device}; keep {pending.passphrase_path} and restore the header backup")
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


def pending_operations(state_dir: Path) -> list[str]:
    """Unfinished rotations and setups whose passphrase is still on disk (for `report`)."""
    found = []
    if (state_dir / PENDING_PASSPHRASE).exists():
        found.append(f"rotate (passphrase in {state_dir / PENDING_PASSPHRASE}); run luksctl rotate again")
    if (state_dir / SETUP_PENDING).exists():
        found.append(f"setup (passphrase in {state_dir / SETUP_PENDING}); run luksctl setup again")
    return found

