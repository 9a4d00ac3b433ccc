"""`luksctl decommission`: end a volume's life so that nothing on the machine opens it again.

Order, each step safe to repeat: close the volume (a busy mount refuses here, before
anything is lost), delete the secret in Vault (a token without `delete` refuses here,
with the volume only closed), erase every keyslot (luksErase), then delete the files
that could open it or describe it: pending passphrases, the header backup and its
checksum, and last the ini, which a re-run needs to find the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import runner
from ..config import VolumeConfig
from ..durable import leftover_temporaries, remove_durably
from ..keystore import Keystore, SecretRef
from . import volume
from . import pending
from .header import HEADER_TIMEOUT, backup_path, checksum_path, read_header


@dataclass
class Decommissioned:
    steps: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)


def decommission(vol: VolumeConfig, ini: Path, keystore: Keystore | None, ref: SecretRef | None) -> Decommissioned:
    done = Decommissioned()
    if volume.close_volume(vol).changed:
        done.steps.append("closed")
    if keystore is not None and ref is not None:
        keystore.delete_metadata(ref)
        done.steps.append(f"deleted {ref} in Vault")
    if Path(vol.device_path).exists() and read_header(vol.device_path).keyslots:
        runner.run(["cryptsetup", "luksErase", "--batch-mode", vol.device_path], timeout=HEADER_TIMEOUT)
        done.steps.append("erased every keyslot")
    done.removed_files += pending.remove_all(ini.parent)
    backup = backup_path(vol.header_path)
    for target in (backup, checksum_path(backup), ini):
        for path in (target, *leftover_temporaries(target)):  # a temporary may be a killed write's copy of the file
            if path.exists():
                remove_durably(path)
                done.removed_files.append(str(path))
    return done
