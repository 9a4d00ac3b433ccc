"""`luksctl report`: what an operator needs at a glance about the volume and its keys.

Everything here only reads: the kernel's state, the LUKS header, the header backup and
the journal. Which keyslot a passphrase opens is shown only for a passphrase given on
stdin, because there is no other way to check it without a secret.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import runner
from ..config import VolumeConfig
from ..errors import CommandFailed, DeviceNotFound
from . import cryptsetup, header, pending
from .journal import Journal
from .volume import current_status

JOURNAL_LINES = 2000  # how far back the last open is looked for


# The commands that change what a header backup opens with: a backup older than the last of them
# opens with keys rotated out, or lacks a key added since.
KEY_CHANGES = frozenset({"setup", "rotate", "recovery-key add", "recovery-key remove", "header restore"})


def last_successes() -> tuple[str | None, str | None]:
    """Times of the last successful `luksctl open` and of the last key change, from the CLI's
    audit lines in the journal (one read for both).

    Only lines root wrote: any local user can log under the identifier luksctl (`logger -t
    luksctl`), but journald itself records the sender's uid (_UID), which no sender can set.
    None when there is no journal (no journalctl) or no such line in its last lines.
    """
    try:
        argv = ["journalctl", "--no-pager", "--output=cat", "--reverse", f"--lines={JOURNAL_LINES}", "SYSLOG_IDENTIFIER=luksctl", "_UID=0"]
        result = runner.run(argv, timeout=30, check=False)
    except CommandFailed:  # journalctl is not installed
        return None, None
    opened = changed = None
    for line in result.stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("outcome") != "ok":
            continue
        if opened is None and entry.get("action") == "open":
            opened = entry.get("time")
        elif changed is None and entry.get("action") in KEY_CHANGES:
            changed = entry.get("time")
        if opened and changed:
            break
    return opened, changed


def build_report(volume: VolumeConfig, passphrase: bytes | None, state_dir: Path) -> dict:
    status = current_status(volume)
    try:
        device, present = header.find_device(volume), True
    except DeviceNotFound:
        device, present = volume.device_path, False
    report: dict = {
        "volume_state": status.state.value,
        "mapper_open": status.mapper_open,
        "mounted": status.mounted,
        "device": device,
        "device_present": present,
    }
    report["last_open"], report["last_key_change"] = last_successes()
    unfinished = pending.unfinished(state_dir)
    report["pending"] = pending.describe(unfinished)
    report["pending_since"] = pending.started(unfinished)
    if "setup" in unfinished:
        report["setup_steps"] = Journal(state_dir).recorded_steps()
    backup = header.backup_path(volume.header_path)
    report["stale_header_copies"] = [str(path) for path in header.stale_copies(backup)]  # before check_backup removes them
    if not report["device_present"]:
        report["header_backup"] = {"path": str(backup), "exists": backup.is_file()}
        return report
    if cryptsetup.is_luks(device):
        luks = cryptsetup.read_header(device)
        report.update(header.describe(luks))
        report["reencrypting"] = luks.reencrypting
    else:
        report["device_header_missing"] = True  # zeroed or overwritten: `header restore` is for this
    report["header_backup"] = {k: v for k, v in vars(header.check_backup(device, backup, time.time())).items() if v is not None}
    if passphrase is not None and "luks_version" in report:
        report["passphrase_opens_slot"] = cryptsetup.opening_slot(device, passphrase)
    return report


def report_lines(report: dict) -> list[str]:
    lines = [
        f"Device:           {report['device']}{'' if report['device_present'] else ' (not attached)'}",
        f"Mapper device:    {'open' if report['mapper_open'] else 'closed'}",
        f"Filesystem:       {'mounted' if report['mounted'] else 'not mounted'}",
    ]
    if report.get("device_header_missing"):
        lines.append("LUKS:             NO HEADER on the device (destroyed or overwritten): luksctl header restore")
    if "luks_version" in report:
        lines.append(f"LUKS:             version {report['luks_version']}, {report['cipher']}, {report['key_size']}-bit key, uuid {report['uuid']}")
        for slot in report["keyslots"]:
            cost = ", ".join(f"{k} {v}" for k, v in slot.items() if k not in ("slot", "pbkdf", "recovery_key"))
            role = " (recovery key)" if slot["recovery_key"] else ""
            lines.append(f"Keyslot {slot['slot']}:{' ' * (9 - len(str(slot['slot'])))}{slot['pbkdf']} ({cost}){role}")
    if report.get("reencrypting"):
        lines.append("RE-ENCRYPTING:    started and not finished (a kill or a power cut?): luksctl reencrypt resumes it")
    if "passphrase_opens_slot" in report:
        opened = report["passphrase_opens_slot"]
        lines.append(f"Given passphrase: {'opens keyslot ' + str(opened) if opened is not None else 'opens no keyslot'}")
    lines.append(f"Header backup:    {describe_backup(report['header_backup'])}")
    lines.append(f"Last open:        {report['last_open'] or 'unknown (no journal entry)'}")
    lines.extend(f"UNFINISHED:       {pending}" for pending in report["pending"])
    lines.extend(f"STALE COPY:       {path} (a header copy a killed run left; the next command that copies the header removes it)"
                 for path in report["stale_header_copies"])
    return lines


def describe_backup(check: dict) -> str:
    if not check["exists"]:
        return f"{check['path']} MISSING"
    if "matches" not in check:
        return f"{check['path']} (device not attached: not compared)"
    if check.get("device_header_missing"):
        return f"{check['path']}, {check['age_seconds'] / 86400:.1f} days old, the device has no header to compare with"
    words = [check["path"], f"{check['age_seconds'] / 86400:.1f} days old"]
    words.append("matches the device" if check["matches"] else "DOES NOT MATCH the device")
    if not check["matches"]:
        words.append("keyslots current" if check["keyslots_current"] else "OLD KEYSLOTS (opens with old keys)")
    if not check["same_volume"]:
        words.append("ANOTHER VOLUME")
    if check.get("intact") is False:
        words.append("DAMAGED (checksum differs from the one recorded)")
    return ", ".join(words)
