"""`luksctl report --prometheus`: the report as metrics for the node exporter's textfile collector.

Only root can read the LUKS header, the header backup and the pending store, so these facts
cannot come from the services' /metrics. The node exporter reads this file on each of its
scrapes (the convention for host facts), so no root process listens on a port. The root side
imports only the standard library, so the text exposition format is written here by hand.

Labels are fixed words (states, operations, PBKDF and step names) and keyslot numbers: no path,
no Vault path, no user and nothing from a secret, whatever the report holds.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from ..durable import leftover_temporaries, remove_durably, write_atomically
from ..errors import ConfigError
from ..status import VolumeState
from .pending import FILES as PENDING_OPERATIONS

TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")  # Debian's prometheus-node-exporter
TEXTFILE_NAME = "luksctl.prom"  # the collector reads *.prom only: our temporaries (.tmp) are not read half-written


class Exposition:
    """Metric families in the text exposition format (version 0.0.4), each with HELP and TYPE."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def gauge(self, name: str, help_text: str, samples: float | bool | None | list[tuple[dict[str, str], float | bool]]) -> None:
        """One gauge; a single value (None: unknown, left out) or (labels, value) pairs."""
        if samples is None:
            return
        if not isinstance(samples, list):
            samples = [({}, samples)]
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        self.lines += [f"{name}{_labels(labels)} {_value(value)}" for labels, value in samples]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float | bool) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _timestamp(iso_time: str | None) -> float | None:
    """An audit line's ISO 8601 time as Unix seconds; None if absent or unreadable."""
    try:
        return datetime.datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp() if iso_time else None
    except ValueError:
        return None


def metrics(report: dict, now: float) -> str:
    """report.build_report's dict as metrics. Units: seconds and bytes, as the names say."""
    out = Exposition()
    out.gauge("luksctl_report_timestamp_seconds", "When luksctl report --prometheus wrote this file (Unix time).", now)
    out.gauge("luksctl_volume_state", "1 for the volume's state (mounted, unmounted, unavailable), 0 for the others.",
              [({"state": state.value}, report["volume_state"] == state.value) for state in VolumeState])
    out.gauge("luksctl_device_present", "1 if the volume's LUKS device is attached.", report["device_present"])
    out.gauge("luksctl_mapper_open", "1 if the volume's device-mapper device is open.", report["mapper_open"])
    out.gauge("luksctl_last_open_timestamp_seconds", "Last successful luksctl open, from root's audit lines in the journal (Unix time).",
              _timestamp(report["last_open"]))
    out.gauge("luksctl_last_key_change_timestamp_seconds",
              "Last successful setup, rotate, recovery-key add or remove, or header restore, from the journal (Unix time).",
              _timestamp(report["last_key_change"]))
    _keyslots(out, report.get("keyslots"))
    _header_backup(out, report["header_backup"])
    out.gauge("luksctl_pending", "1 while a setup or rotate is unfinished: its passphrase waits in /etc/luks; run it again.",
              [({"operation": operation}, operation in report["pending_since"]) for operation in PENDING_OPERATIONS])
    out.gauge("luksctl_pending_since_timestamp_seconds", "When the unfinished operation's oldest file was written (Unix time).",
              [({"operation": operation}, since) for operation, since in report["pending_since"].items()] or None)
    steps = report.get("setup_steps")
    out.gauge("luksctl_setup_last_step_info", "The last step an unfinished setup recorded (in /etc/luks/setup-state.json).",
              [({"step": steps[-1]}, 1)] if steps else None)
    out.gauge("luksctl_stale_header_copies", "Header copies a killed run left (they open with the keys of their day).",
              len(report["stale_header_copies"]))
    return out.text()


def _keyslots(out: Exposition, keyslots: list[dict] | None) -> None:
    if keyslots is None:  # device not attached, or no LUKS header on it: unknown, not zero
        return
    out.gauge("luksctl_keyslots_in_use", "Keyslots that hold a key.", len(keyslots))
    out.gauge("luksctl_keyslot_info", "One per keyslot in use: its PBKDF, and whether it holds the recovery key.",
              [({"slot": str(slot["slot"]), "pbkdf": slot["pbkdf"], "recovery_key": str(slot["recovery_key"]).lower()}, 1) for slot in keyslots])
    out.gauge("luksctl_keyslot_pbkdf_iterations", "PBKDF2 iterations, or the Argon2 time cost (passes), of each keyslot.",
              [({"slot": str(slot["slot"])}, slot.get("iterations", slot.get("time"))) for slot in keyslots if "iterations" in slot or "time" in slot] or None)
    out.gauge("luksctl_keyslot_pbkdf_memory_bytes", "Argon2 memory cost of each keyslot, in bytes.",
              [({"slot": str(slot["slot"])}, slot["memory"] * 1024) for slot in keyslots if "memory" in slot] or None)


def _header_backup(out: Exposition, backup: dict) -> None:
    out.gauge("luksctl_header_backup_present", "1 if the header backup file exists.", backup["exists"])
    out.gauge("luksctl_header_backup_age_seconds", "Age of the header backup file (since its last write).", backup.get("age_seconds"))
    out.gauge("luksctl_header_backup_matches", "1 if the header backup is byte-identical to the device's header now.", backup.get("matches"))
    out.gauge("luksctl_header_backup_intact", "1 if the header backup still has the checksum recorded when it was written.", backup.get("intact"))
    keyslots_current = backup.get("keyslots_current")
    out.gauge("luksctl_header_backup_older_than_key_change",
              "1 if the header backup's keyslots differ from the device's: a key changed since it was written "
              "(it opens with keys rotated out, or lacks one added), or it is another volume's.",
              None if keyslots_current is None else not (keyslots_current and backup.get("same_volume", True)))


def write(text: str, directory: Path) -> Path:
    """Replace <directory>/luksctl.prom (0644: the node exporter runs as its own user), whole or not at all."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory: install prometheus-node-exporter, or give its textfile directory with --textfile-dir")
    path = directory / TEXTFILE_NAME
    for temporary in leftover_temporaries(path):  # a killed run's: never read (not *.prom), but clutter
        remove_durably(temporary)
    write_atomically(path, text.encode(), mode=0o644)
    return path
