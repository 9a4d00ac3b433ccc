"""The key lifecycle subcommands of `luksctl`: report, header, recovery-key, rotate, reencrypt, decommission.

cli.py registers them (add_commands) and runs them like the others: errors, exit
codes, --json and the audit line stay in one place there. Commands that change the
header hold the same lock as open and close, so no open races a keyslot change; each
reads its passphrase or token, unwraps, and asks for confirmation before it takes it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config import VolumeConfig, load_volume_config
from ..errors import EXIT_OK, EXIT_STALE_BACKUP, Refused, UsageError
from ..locking import exclusive_lock
from ..secret_input import read_passphrase, read_token
from . import cryptsetup, header, keys, report, textfile
from .decommission import decommission
from .keystore_options import add_vault_arguments, keystore_from_args, secret_ref
from .reencrypt import Keys, NewCipher, Reencrypted, passphrases_for, progress_lines, reencrypt, reencryption_unfinished
from .rotate import rotate


@dataclass
class Outcome:
    details: dict
    text: list[str]
    exit_code: int = EXIT_OK
    changed: bool = False


@dataclass(frozen=True)
class Context:
    """What a lifecycle command gets from cli.main."""

    volume_ini: Path
    lock_file: Path
    lock_wait: float  # cli.LOCK_WAIT: the lock open and close hold, waited on as they wait
    root_owned: bool
    stdin: BinaryIO
    stdin_is_tty: bool

    @property
    def state_dir(self) -> Path:
        """Where unfinished setups and rotations keep their passphrase: beside the ini (/etc/luks)."""
        return self.volume_ini.parent

    def read_passphrase(self) -> bytes:
        return read_passphrase(self.stdin, self.stdin_is_tty)

    def volume(self) -> VolumeConfig:
        return load_volume_config(self.volume_ini, root_owned=self.root_owned)

    def locked(self):
        return exclusive_lock(self.lock_file, timeout=self.lock_wait, what="luksctl command on this volume")

    def confirm(self, args: argparse.Namespace, volume: VolumeConfig, what: str) -> None:
        """--yes, or the volume's name typed on a terminal; anything else refuses."""
        if args.yes:
            return
        if not self.stdin_is_tty:
            raise Refused(f"{what}: confirm with --yes (stdin is not a terminal to ask on); nothing was changed")
        print(f"{what}. Type the volume name '{volume.cryptdev}' to go on: ", end="", file=sys.stderr, flush=True)
        if self.stdin.readline().decode(errors="replace").strip() != volume.cryptdev:
            raise Refused(f"{what}: not confirmed; nothing was changed")


def add_pbkdf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pbkdf", choices=cryptsetup.PBKDF_CHOICES, help="of the new keyslot; default: cryptsetup's (argon2id)")
    parser.add_argument("--iter-time", type=int, metavar="MS", help="PBKDF time in milliseconds; default: cryptsetup's")


def add_keyslot_arguments(parser: argparse.ArgumentParser) -> None:
    """What a re-encryption does with the recovery key: cryptsetup keeps only the keyslots whose key it gets."""
    others = parser.add_mutually_exclusive_group()
    others.add_argument("--recovery-key-file", metavar="FILE", help="re-encryption keeps the recovery key: its key, read from FILE (not '-')")
    others.add_argument("--drop-other-keyslots", action="store_true", help="re-encryption removes every keyslot but the passphrase's, the recovery key's too")


def add_commands(commands: argparse._SubParsersAction) -> None:
    def add(parent, name: str, help_text: str) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)  # "--token" must not mean --token-file
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    report_parser = add(commands, "report", "the volume, its keyslots, header backup and last open at a glance")
    report_parser.add_argument("--check-passphrase", action="store_true", help="read a passphrase on stdin and say which keyslot it opens")
    report_parser.add_argument("--prometheus", action="store_true", help="also write the report as metrics for the node exporter's textfile collector")
    report_parser.add_argument("--textfile-dir", type=Path, default=textfile.TEXTFILE_DIR, metavar="DIR",
                               help=f"the textfile collector's directory (default: {textfile.TEXTFILE_DIR})")

    header_actions = add(commands, "header", "back up, verify or restore the LUKS header").add_subparsers(dest="action", required=True, metavar="ACTION")
    add(header_actions, "backup", "write the header to header_path (0600) and record its checksum")
    verify = add(header_actions, "verify", "does the backup match the device's header and its current keyslots? (exit 0 if so, 8 if not)")
    restore = add(header_actions, "restore", "write the backup back over the device's header (same volume only)")
    restore.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for header_parser in (verify, restore):
        header_parser.add_argument("--device", help="the volume's device, when its header is gone and the ini's device path is not it")

    recovery = add(commands, "recovery-key", "add or remove a recovery key (for the day Vault is lost)").add_subparsers(dest="action", required=True, metavar="ACTION")
    add_key = add(recovery, "add", "add a recovery key in its own keyslot; the current passphrase comes on stdin")
    add_key.add_argument("--output", type=Path, help="write the key to this new file (0600) instead of printing it")
    add_pbkdf_arguments(add_key)
    add(recovery, "remove", "remove the recovery key; the stored passphrase comes on stdin and must open another keyslot")

    rotate_parser = add(commands, "rotate", "replace the passphrase with a new one, stored as a new version in Vault (works while mounted)")
    add_vault_arguments(rotate_parser, "Vault (the token needs read and update on the secret)", required=True)
    rotate_parser.add_argument("--reencrypt", action="store_true",
                               help="then a new volume key too (as luksctl reencrypt): nothing from before opens the volume")
    add_keyslot_arguments(rotate_parser)
    add_pbkdf_arguments(rotate_parser)

    reencrypt_parser = add(commands, "reencrypt", "a new volume key: re-encrypt every sector, online while mounted (a re-run resumes)")
    add_vault_arguments(reencrypt_parser, "Vault, to read the passphrase from (without --vault-url: the passphrase on stdin)", required=False)
    reencrypt_parser.add_argument("--cipher", type=_cipher_name, help="a new cipher, e.g. aes-xts-plain64; default: keep the volume's")
    reencrypt_parser.add_argument("--key-size", type=int, metavar="BITS", help="of the new volume key; default: keep the volume's")
    add_keyslot_arguments(reencrypt_parser)
    add_pbkdf_arguments(reencrypt_parser)

    decommission_parser = add(commands, "decommission", "close the volume, erase every keyslot, delete the secret in Vault, the header backup and the ini")
    add_vault_arguments(decommission_parser, "Vault (the token needs delete on <root>/metadata/<path>: the dashboard's delete_only policy)", required=True)
    decommission_parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def run(args: argparse.Namespace, context: Context) -> Outcome:
    return HANDLERS[" ".join(filter(None, (args.command, getattr(args, "action", None))))](args, context)


def cmd_report(args: argparse.Namespace, context: Context) -> Outcome:
    passphrase = context.read_passphrase() if args.check_passphrase else None
    details = report.build_report(context.volume(), passphrase, context.state_dir)
    lines = report.report_lines(details)
    if args.prometheus:
        written = textfile.write(textfile.metrics(details, time.time()), args.textfile_dir)
        details["textfile"] = str(written)
        lines.append(f"Metrics:          written to {written}")
    return Outcome(details, lines)


def _refresh_backup(volume: VolumeConfig) -> dict:
    path = header.backup_path(volume.header_path)
    return {"header_backup": str(path), "header_checksum": header.write_backup(volume.device_path, path)}


def cmd_header_backup(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    cryptsetup.require_device(volume.device_path)
    with context.locked():
        details = _refresh_backup(volume)
    return Outcome(details, [f"Header backup:    {details['header_backup']} (sha256 {details['header_checksum']})"], changed=True)


def cmd_header_verify(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    check = header.check_backup(header.find_device(volume, args.device), header.backup_path(volume.header_path), time.time())
    details = {key: value for key, value in vars(check).items() if value is not None}
    return Outcome({"header_backup": details}, [f"Header backup:    {report.describe_backup(details)}"], EXIT_OK if check.ok else EXIT_STALE_BACKUP)


def cmd_header_restore(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    device = header.find_device(volume, args.device)
    backup = header.backup_path(volume.header_path)
    with header.verified_copy(backup) as copy:  # before asking: a refusal needs no answer
        warnings = header.check_restorable(device, copy, backup, volume.uuid, volume.cryptdev)
    context.confirm(args, volume, "; ".join([f"This overwrites the LUKS header of {device} with {backup}", *warnings]))
    with context.locked(), header.verified_copy(backup) as copy:  # again: the backup may have changed while we asked
        warnings = header.check_restorable(device, copy, backup, volume.uuid, volume.cryptdev)
        cryptsetup.restore_header(device, copy)  # the copy checked, which nobody else can write
    details = {"restored_from": str(backup), **({"warnings": warnings} if warnings else {})}
    return Outcome(details, [f"Header restored:  from {backup}", *(f"WARNING:          {warning}" for warning in warnings)], changed=True)


def cmd_recovery_add(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    cryptsetup.require_device(volume.device_path)
    stored = context.read_passphrase()
    with context.locked():
        slot, key = keys.add_recovery_key(volume.device_path, stored, cryptsetup.Pbkdf(args.pbkdf, args.iter_time), args.output)
        details = {"recovery_slot": slot, **_refresh_backup(volume)}
    if args.output is not None:
        details["written_to"] = str(args.output)
        text = [f"Recovery key:     keyslot {slot}, written to {args.output}"]
    else:  # printed once, on stdout only; it is never logged
        details["recovery_key"] = key.decode()
        text = [f"Recovery key:     keyslot {slot}", key.decode(), "Store it offline now: it is not shown again."]
    return Outcome(details, text, changed=True)


def cmd_recovery_remove(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    cryptsetup.require_device(volume.device_path)
    stored = context.read_passphrase()
    with context.locked():
        removed = keys.remove_recovery_key(volume.device_path, stored)
        details = {"removed_slots": removed, **(_refresh_backup(volume) if removed is not None else {})}
    if removed is None:
        return Outcome(details, ["Recovery key:     none to remove"])
    return Outcome(details, [f"Recovery key:     removed (keyslots {removed or 'already gone'})"], changed=True)


def cmd_rotate(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    cryptsetup.require_device(volume.device_path)
    ref = secret_ref(args)
    backup = header.backup_path(volume.header_path)
    pbkdf = cryptsetup.Pbkdf(args.pbkdf, args.iter_time)
    if not args.reencrypt and (args.recovery_key_file or args.drop_other_keyslots):
        raise UsageError("--recovery-key-file and --drop-other-keyslots go with --reencrypt")
    recovery_key = _recovery_key(args, context) if args.reencrypt else None
    rotation = done = None
    with keystore_from_args(args, context.stdin) as keystore, context.locked():
        reencrypting = reencryption_unfinished(volume.device_path, context.state_dir)
        if reencrypting and not args.reencrypt:
            # Mid-way the header holds keyslots of the old and the new volume key; cryptsetup let
            # rotate change them (exit 0). Whether the resume then still works is not ours to bet on.
            raise Refused(f"a re-encryption of {volume.device_path} is unfinished; finish it first with "
                          "`luksctl reencrypt` (or `luksctl rotate --reencrypt`), then rotate; nothing was changed")
        if not reencrypting:  # else only the re-encryption is left (rotate --reencrypt resumes it)
            if args.reencrypt:  # what the re-encryption would refuse is refused now, before the new passphrase
                passphrases_for(volume.device_path, cryptsetup.read_header(volume.device_path),
                                Keys(keystore.read(ref).value.encode(), recovery_key, args.drop_other_keyslots))
            rotation = rotate(volume.device_path, keystore, ref, context.state_dir, backup, pbkdf)
        if args.reencrypt:
            keys = Keys(keystore.read(ref).value.encode(), recovery_key, args.drop_other_keyslots)
            done = reencrypt(volume, keys, NewCipher(), pbkdf, context.state_dir, progress_lines(sys.stdout) if args.json else None)
    details: dict = {}
    text: list[str] = []
    if rotation is not None:
        details = {"new_slot": rotation.new_slot, "removed_slot": rotation.removed_slot, "vault_version": rotation.vault_version,
                   "resumed": rotation.resumed, "steps": rotation.steps}
        text = [f"Rotated:          keyslot {rotation.new_slot} holds the new passphrase, stored in Vault at {ref}"
                + (f" (version {rotation.vault_version})" if rotation.vault_version else ""),
                f"Old keyslot:      {'removed: ' + str(rotation.removed_slot) if rotation.removed_slot is not None else 'already gone'}",
                f"Header backup:    rewritten ({backup})"]
    if done is not None:
        details["reencryption"] = _reencryption_details(done)
        text += _reencryption_text(volume, done)
    return Outcome(details, text, changed=True)


def _cipher_name(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9:-]*", value):  # aes-xts-plain64, aes-cbc-essiv:sha256; never an option
        raise argparse.ArgumentTypeError(f"{value!r} is not a cipher name such as aes-xts-plain64")
    return value


def _stored_passphrase(args: argparse.Namespace, context: Context) -> bytes:
    """From Vault with --vault-url (the token unwrapped and revoked before the lock), else on stdin."""
    if args.vault_url is None:
        return context.read_passphrase()
    if not (args.wrapping_token_file or args.token_file) or not args.secret_path:
        raise UsageError("--vault-url needs --secret-path and --wrapping-token-file or --token-file")
    with keystore_from_args(args, context.stdin) as keystore:
        return keystore.read(secret_ref(args)).value.encode()


def _recovery_key(args: argparse.Namespace, context: Context) -> bytes | None:
    if args.recovery_key_file == "-":
        raise UsageError("--recovery-key-file takes a file (or a FIFO such as <(...)): stdin carries the passphrase or the token")
    return read_token(args.recovery_key_file, context.stdin, "recovery key").encode() if args.recovery_key_file else None


def _reencryption_details(done: Reencrypted) -> dict:
    return {"reencrypted": True, "online": done.online, "resumed": done.resumed, "cipher": done.cipher, "key_size": done.key_size,
            "keyslots": done.keyslots, "header_backup": done.header_backup, "header_checksum": done.header_checksum, "steps": done.steps}


def _reencryption_text(volume: VolumeConfig, done: Reencrypted) -> list[str]:
    return [f"Re-encrypted:     {volume.device_path} with a new volume key ({done.cipher}, {done.key_size}-bit), "
            + ("online" if done.online else "offline") + (", resumed" if done.resumed else ""),
            f"Keyslots:         {', '.join(map(str, done.keyslots))}",
            f"Header backup:    rewritten ({done.header_backup})"]


def cmd_reencrypt(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    cryptsetup.require_device(volume.device_path)
    recovery_key = _recovery_key(args, context)
    secrets = Keys(_stored_passphrase(args, context), recovery_key, args.drop_other_keyslots)
    on_progress = progress_lines(sys.stdout) if args.json else None  # else cryptsetup's own bar, on a terminal
    with context.locked():
        done = reencrypt(volume, secrets, NewCipher(args.cipher, args.key_size), cryptsetup.Pbkdf(args.pbkdf, args.iter_time),
                         context.state_dir, on_progress)
    return Outcome(_reencryption_details(done), _reencryption_text(volume, done), changed=True)


def cmd_decommission(args: argparse.Namespace, context: Context) -> Outcome:
    volume = context.volume()
    header.find_device(volume)
    ref = secret_ref(args)
    context.confirm(args, volume, f"This erases every keyslot of {volume.device_path} and deletes {ref} in Vault: the data is lost")
    with keystore_from_args(args, context.stdin) as keystore, context.locked():
        done = decommission(volume, context.volume_ini, keystore, ref)
    text = [f"Decommissioned:   {', '.join(done.steps) or 'nothing left to do'}", *(f"Removed:          {path}" for path in done.removed_files)]
    return Outcome({"steps": done.steps, "removed_files": done.removed_files}, text, changed=bool(done.steps or done.removed_files))


HANDLERS = {
    "report": cmd_report,
    "header backup": cmd_header_backup,
    "header verify": cmd_header_verify,
    "header restore": cmd_header_restore,
    "recovery-key add": cmd_recovery_add,
    "recovery-key remove": cmd_recovery_remove,
    "rotate": cmd_rotate,
    "reencrypt": cmd_reencrypt,
    "decommission": cmd_decommission,
}
