"""`luksctl reencrypt`: a new volume key under the data, online while the volume stays mounted.

A new passphrase (rotate) does not help against whoever once held the volume key itself: a
former administrator who ran `dmsetup table --showkeys`, or a memory image of the VM taken by
its host. Re-encryption writes every sector again under a new key. cryptsetup (LUKS2, 2.2 and
later) does the work, online through the open mapping, and keeps its own resilience data in the
header, so what is left here is to decide, then do:

1. refuse LUKS1 (cryptsetup cannot re-encrypt it online; converting it first is the operator's call),
   and a setup or rotation that has not finished;
2. if the header records a re-encryption already started, resume it (`--resume-only`); when a killed
   online run left its device stack active, first recover it (below);
3. if the state file says one ran and the volume key has changed since, cryptsetup had finished;
4. otherwise decide what becomes of the other keyslots: cryptsetup keeps only those whose passphrase
   it is given, so the recovery key is kept when its key is given, removed when
   --drop-other-keyslots says so, and the command refused when neither;
5. write a fresh header backup (the old one holds the old volume key), then remove the state file.

Run under the volume lock, so an open meanwhile gets "busy" (the API's 503), never a half state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import runner
from ..config import VolumeConfig
from ..errors import Refused, WrongPassphrase
from ..status import find_mapper_device
from .cryptsetup import LuksHeader, Pbkdf, Reencryption, opening_slot, opens, read_header, remove_token, resume_reencryption, start_reencryption
from .header import backup_path, write_backup
from .pending import REENCRYPTION, PendingStore, describe, unfinished
from .setup import mount_options
from .volume import current_status, luks_open, mount, umount

# What a killed online `cryptsetup reencrypt` leaves active besides the mapping, which it had
# reloaded to point through them (libcryptsetup's names), in the order they can be removed:
# the mapping points at the overlay, the overlay at the hotzone device (seen with dmsetup table).
KILLED_RUN_DEVICES = ("{}-overlay", "{}-hotzone-forward", "{}-hotzone-backward")
DMSETUP_TIMEOUT = 60
SYS_DEV_BLOCK = Path("/sys/dev/block")


@dataclass(frozen=True)
class Keys:
    """What opens the volume, and what to do with the keyslots of other keys."""

    passphrase: bytes  # the stored one (Vault's)
    recovery_key: bytes | None = None  # keep the recovery key: its keyslot is made again for the new volume key
    drop_other_keyslots: bool = False  # or remove every keyslot but the passphrase's


@dataclass(frozen=True)
class NewCipher:
    """None keeps the volume's."""

    cipher: str | None = None
    key_size: int | None = None


@dataclass
class Reencrypted:
    online: bool
    resumed: bool
    cipher: str
    key_size: int
    keyslots: list[int]
    header_backup: str
    header_checksum: str
    steps: list[str] = field(default_factory=list)


def refuse_luks1(header: LuksHeader, device: str) -> None:
    if header.version != 2:
        raise Refused(f"{device} is LUKS1, which cryptsetup re-encrypts only offline and without resilience; nothing was changed. "
                      "Back the header up (luksctl header backup), close the volume, convert it with "
                      f"`cryptsetup convert --type luks2 {device}`, then run luksctl reencrypt again")


def passphrases_for(device: str, header: LuksHeader, keys: Keys) -> tuple[list[bytes], int | None]:
    """What cryptsetup is given: the passphrases in slot order, and the one keyslot kept alone (None: all kept)."""
    slot = opening_slot(device, keys.passphrase)
    if slot is None:
        raise WrongPassphrase(f"the passphrase given does not open {device}; nothing was changed")
    if slot in header.recovery_slots:
        raise Refused(f"the passphrase given is the recovery key (keyslot {slot}); give the stored passphrase; nothing was changed")
    others = sorted(set(header.keyslots) - {slot})
    if not others:
        return [keys.passphrase], None
    if keys.drop_other_keyslots:
        return [keys.passphrase], slot
    if keys.recovery_key is None:
        which = "the recovery key" if set(others) <= header.recovery_slots else "keys other than the stored passphrase"
        raise Refused(f"keyslots {others} of {device} hold {which}, and re-encryption keeps only the keyslots whose key it is given; "
                      "give the recovery key with --recovery-key-file FILE to keep it, or remove them with --drop-other-keyslots "
                      "(then `luksctl recovery-key add` issues a new one); nothing was changed")
    recovery_slot = opening_slot(device, keys.recovery_key)
    if recovery_slot is None or recovery_slot not in header.recovery_slots:
        raise WrongPassphrase(f"the key of --recovery-key-file does not open the recovery keyslot of {device}; nothing was changed")
    unknown = [other for other in others if other != recovery_slot]
    if unknown:
        raise Refused(f"keyslots {unknown} of {device} hold neither the stored passphrase nor the recovery key; remove them "
                      "(cryptsetup luksKillSlot) or re-encrypt with --drop-other-keyslots; nothing was changed")
    if b"\n" in keys.passphrase:
        raise Refused("the stored passphrase holds a newline, and cryptsetup reads one passphrase a line when it keeps several "
                      "keyslots; re-encrypt with --drop-other-keyslots, or rotate first; nothing was changed")
    by_slot = {slot: keys.passphrase, recovery_slot: keys.recovery_key}
    return [by_slot[number] for number in sorted(by_slot)], None


def drop_empty_recovery_labels(device: str, header: LuksHeader) -> bool:
    """The recovery label of a keyslot --drop-other-keyslots removed: `recovery-key add` may label a new one."""
    empty = [token_id for token_id, slots in header.recovery_tokens.items() if not set(slots) & set(header.keyslots)]
    for token_id in empty:
        remove_token(device, token_id)
    return bool(empty)


def reencrypt(volume: VolumeConfig, keys: Keys, new: NewCipher, pbkdf: Pbkdf, state_dir: Path,
              on_progress: Callable[[dict], None] | None) -> Reencrypted:
    device = volume.device_path
    header = read_header(device)
    refuse_luks1(header, device)
    others = describe(unfinished(state_dir, other_than="reencrypt"))
    if others:
        raise Refused(f"finish this first: {'; '.join(others)}; nothing was changed")
    steps = []
    stack = killed_run_stack(volume.cryptdev) if header.reencrypting else []
    if stack:
        recover_killed_online_run(volume, keys.passphrase, stack)
        steps.append("unmounted, recovered the killed run's hotzone and mounted again")
    online = current_status(volume).mapper_open
    job = Reencryption(device, volume.cryptdev if online else None, on_progress)
    store = PendingStore(state_dir, "reencrypt")
    state = _load_state(store)
    resumed = header.reencrypting or state is not None
    if header.reencrypting:
        resume_reencryption(job, keys.passphrase)
        steps.append("resumed the re-encryption")
    elif state is not None and header.volume_key_digest != state["volume_key_digest"]:
        steps.append("found the re-encryption finished")
    else:
        passphrases, keep_only_slot = passphrases_for(device, header, keys)
        store.write(REENCRYPTION, json.dumps({"volume_key_digest": header.volume_key_digest, "started": time.time()}).encode() + b"\n")
        start_reencryption(job, passphrases, keep_only_slot=keep_only_slot, cipher=new.cipher, key_size=new.key_size, pbkdf=pbkdf)
        steps.append("re-encrypted")
    after = read_header(device)
    if drop_empty_recovery_labels(device, after):
        steps.append("removed the label of the dropped recovery key")
        after = read_header(device)
    backup = backup_path(volume.header_path)
    checksum = write_backup(device, backup)
    steps.append("wrote header backup")
    store.remove(REENCRYPTION)
    return Reencrypted(online, resumed, after.cipher, after.key_size, sorted(after.keyslots), str(backup), checksum, steps)


def killed_run_stack(cryptdev: str) -> list[str]:
    return [name for name in (pattern.format(cryptdev) for pattern in KILLED_RUN_DEVICES) if find_mapper_device(name)]


def recover_killed_online_run(volume: VolumeConfig, passphrase: bytes, stack: list[str]) -> None:
    """Put back the mapping a SIGKILLed online run left pointing through its hotzone devices.

    `--resume-only --active-name` refuses such a mapping ("Mismatching parameters"), and cryptsetup
    recovers the hotzone from its resilience data only when it activates the device. So: fail the
    I/O a device left suspended holds (below), unmount (refused while something uses the volume),
    remove the mapping and its stack, open (cryptsetup recovers), mount. The volume is unmounted
    for that long. Each step looks first, so a run killed during this one picks up where it stopped.

    A run killed mid-hotzone leaves its hotzone device suspended, and the I/O queued there aimed at
    a layout the kill left half rewritten: resumed as it is, the unmount's writes landed where the
    resilience data no longer described them, and the filesystem did not mount again (seen in the
    VM, scripts/bench_reencrypt.py). Loaded with an error table first, that I/O fails, as a power
    cut would have lost it, and the open recovers exactly what had reached the disk.
    """
    if not opens(volume.device_path, passphrase):
        raise WrongPassphrase(f"the passphrase given does not open {volume.device_path}; nothing was changed")
    for name in [volume.cryptdev, *stack]:  # a suspended device would hang the unmount and everyone's I/O
        if _suspended(name):
            runner.run(["dmsetup", "load", name, "--table", f"0 {_sectors(name)} error"], timeout=DMSETUP_TIMEOUT)
            runner.run(["dmsetup", "resume", name], timeout=DMSETUP_TIMEOUT)
    status = current_status(volume)
    if status.mounted:
        umount(volume)
    for name in [volume.cryptdev] * status.mapper_open + stack:
        runner.run(["dmsetup", "remove", name], timeout=DMSETUP_TIMEOUT)
    luks_open(volume, passphrase)
    mount(volume, mount_options())


def _suspended(name: str) -> bool:
    device = find_mapper_device(name)  # major:minor
    return device is not None and (SYS_DEV_BLOCK / device / "dm" / "suspended").read_text().strip() == "1"


def _sectors(name: str) -> int:
    return int((SYS_DEV_BLOCK / find_mapper_device(name) / "size").read_text())


def reencryption_unfinished(device: str, state_dir: Path) -> bool:
    """Started and not done: cryptsetup's requirement in the header, or our state file (rotate --reencrypt resumes from either)."""
    return read_header(device).reencrypting or PendingStore(state_dir, "reencrypt").exists(REENCRYPTION)


def _load_state(store: PendingStore) -> dict | None:
    text = store.read(REENCRYPTION)
    if text is None:
        return None
    try:
        state = json.loads(text)
        if isinstance(state, dict) and isinstance(state.get("volume_key_digest"), str):
            return state
    except ValueError:
        pass
    raise Refused(f"{store.path(REENCRYPTION)} is damaged; compare the volume key digest in luksDump with the header backup's, then move it away")


def progress_lines(out) -> Callable[[dict], None]:
    """cryptsetup's --progress-json lines as luksctl's JSON events (setup's form), one a line on `out`."""

    def report(line: dict) -> None:
        done, total = int(line.get("device_bytes", 0)), int(line.get("device_size", 0))
        event = {"event": "reencrypt", "bytes_done": done, "bytes_total": total, "percent": done * 100 // max(total, 1),
                 "speed": int(line.get("speed", 0)), "eta_ms": int(line.get("eta_ms", 0))}
        print(json.dumps(event), file=out, flush=True)

    return report
