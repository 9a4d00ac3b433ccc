"""`luksctl decommission`: end a volume's life so that nothing on the machine opens it again.

Order, each step safe to repeat: close the volume (a busy mount refuses here, before
anything is lost), delete the secret in Vault (a token without `delete` refuses here,
with the volume only closed), erase every keyslot (luksErase), then delete the files
that could open it or describe it: header copies a killed run left, pending
passphrases, the header backup and its checksum, and last the ini, which a re-run
needs to find the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import VolumeConfig
from ..durable import leftover_temporaries, remove_durably
from ..vault import SecretRef, VaultClient
from . import cryptsetup, pending, volume
from .header import backup_path, checksum_path, find_device, remove_stale_copies


@dataclass
class Decommissioned:
    steps: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)


def decommission(vol: VolumeConfig, ini: Path, keystore: VaultClient | None, ref: SecretRef | None) -> Decommissioned:
    done = Decommissioned()
    device = find_device(vol)  # before anything changes; found by the ini's device path too, when the header is gone
    if volume.close_volume(vol).changed:
        done.steps.append("closed")
    if keystore is not None and ref is not None:
        keystore.delete_metadata(ref)
        done.steps.append(f"deleted {ref} in Vault")
    if cryptsetup.is_luks(device) and cryptsetup.read_header(device).keyslots:  # a destroyed header has none left
        cryptsetup.erase(device)
        done.steps.append("erased every keyslot")
    done.removed_files += pending.remove_all(ini.parent)
    backup = backup_path(vol.header_path)
    done.removed_files.extend(str(path) for path in remove_stale_copies(backup))  # header copies of killed runs
    for target in (backup, checksum_path(backup), ini):
        for path in (target, *leftover_temporaries(target)):  # a temporary may be a killed write's copy of the file
            if path.exists():
                remove_durably(path)
                done.removed_files.append(str(path))
    return done
