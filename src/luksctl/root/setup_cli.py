"""The command lines of setup: `luksctl setup` and the pyluks-compatible `fastluks`.

Both build SetupOptions and go through run(), which holds the setup lock,
maps errors to exit codes once, audits, and prints the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, TextIO

from .. import audit
from ..config import VOLUME_INI
from ..errors import EXIT_COMMAND_FAILED, EXIT_OK, CommandFailed, LuksctlError, UsageError
from ..locking import exclusive_lock
from . import cryptsetup
from .keystore_options import add_vault_arguments, secret_ref
from .setup import Progress, SetupOptions, SetupReport, VaultTarget, run_setup

log = logging.getLogger("luksctl")

SETUP_LOCK = Path("/run/luksctl-setup.lock")
LOCK_WAIT = 1  # a second setup on the same machine is refused, not queued


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    device = parser.add_argument_group("volume")
    device.add_argument("--device", required=True, help="the blank block device to encrypt, e.g. /dev/vdb")
    device.add_argument("--cryptdev", default="crypt", help="device-mapper name (default: crypt)")
    device.add_argument("-m", "--mountpoint", default="/export", help="where to mount it (default: /export)")
    device.add_argument("-f", "--filesystem", default="ext4", help="filesystem to make (default: ext4)")
    device.add_argument("--cryptdev-file", type=Path, default=VOLUME_INI, help=f"volume description to write (default: {VOLUME_INI})")
    device.add_argument("--header-backup-file", type=Path, default=cryptsetup.DEFAULT_HEADER_BACKUP,
                        help=f"LUKS header backup, 0600 (default: {cryptsetup.DEFAULT_HEADER_BACKUP})")
    luks = parser.add_argument_group("LUKS2 (defaults: cryptsetup's own current choices)")
    luks.add_argument("-c", "--cipher", default="aes-xts-plain64")
    luks.add_argument("-s", "--key-size", type=int, default=512, help="bits; 512 is AES-256 in XTS mode (default: 512)")
    luks.add_argument("--hash", default="sha256")
    luks.add_argument("--pbkdf", default="argon2id", choices=cryptsetup.PBKDF_CHOICES)
    luks.add_argument("--iter-time", type=int, help="milliseconds of PBKDF work per unlock")
    luks.add_argument("--pbkdf-force-iterations", type=int, help="fixed PBKDF cost instead of a benchmark (tests)")
    secret = parser.add_argument_group("passphrase")
    secret.add_argument("-l", "--passphrase-length", type=int, default=64, help="generated passphrase length (default: 64)")
    secret.add_argument("--passphrase-stdin", action="store_true", help="use the passphrase piped on stdin instead of generating one")
    add_vault_arguments(parser, "Vault (where the passphrase is stored)", required=False)
    run = parser.add_argument_group("run")
    run.add_argument("--wipe", action="store_true", help="zero the whole volume through the mapper (long on a large disk)")
    run.add_argument("--dry-run", action="store_true", help="check and print the plan; change nothing")
    run.add_argument("--force", action="store_true", help="encrypt even if a filesystem, partition table or LUKS signature is found")


def options_from_args(args: argparse.Namespace, stdin: BinaryIO) -> SetupOptions:
    token_source = args.wrapping_token_file or args.token_file
    if args.passphrase_stdin and token_source == "-":
        raise UsageError("stdin cannot carry both the passphrase and the token: put the token in a file")
    vault = None
    if args.vault_url or args.secret_path:
        if not (args.vault_url and args.secret_path):
            raise UsageError("--vault-url and --secret-path go together")
        vault = VaultTarget(args.vault_url, secret_ref(args), token_source, args.wrapping_token_file is not None or token_source is None,
                            args.vault_ca_bundle, args.vault_timeout, args.vault_allow_http)
    elif token_source:
        raise UsageError("a token was given but no Vault location (--vault-url, --secret-path)")
    passphrase = None
    if args.passphrase_stdin:
        from .cli import read_passphrase  # the one reader of piped passphrases (cli imports us: import late)

        passphrase = read_passphrase(stdin, is_tty=False)
    return SetupOptions(
        device=args.device, cryptdev=args.cryptdev, mountpoint=args.mountpoint, filesystem=args.filesystem,
        cipher=args.cipher, key_size=args.key_size, hash=args.hash, pbkdf=args.pbkdf, iter_time=args.iter_time,
        pbkdf_force_iterations=args.pbkdf_force_iterations, passphrase_length=args.passphrase_length,
        passphrase=passphrase, vault=vault, wipe=args.wipe, dry_run=args.dry_run, force=args.force,
        ini_path=args.cryptdev_file, header_path=args.header_backup_file,
    )


def print_text(report: SetupReport, out: TextIO) -> None:
    if report.plan:
        print("Plan (nothing was changed):", file=out)
        for number, step in enumerate(report.plan, 1):
            print(f"  {number}. {step}", file=out)
        return
    if report.error:
        print(f"Setup of {report.device}: [ FAIL ] {report.error}", file=out)
        return
    what = "already set up, nothing to do" if not report.changed else f"encrypted (LUKS UUID {report.uuid}) and {report.volume_state}"
    print(f"Setup of {report.device}: [ OK ] {what}", file=out)


def run(options_factory, *, stdin: BinaryIO, json_output: bool, lock_file: Path = SETUP_LOCK, action: str = "setup") -> int:
    """Build the options, run setup under the lock, report. Returns the exit code."""
    started = time.monotonic()
    report = SetupReport("unavailable", "?")
    error_class = None
    vault_path = None
    try:
        options: SetupOptions = options_factory()
        report.device = options.device
        vault_path = str(options.vault.ref) if options.vault else None
        if os.geteuid() != 0:
            raise LuksctlError(f"{action} must run as root")
        progress = Progress(json_lines=json_output)
        with exclusive_lock(lock_file, timeout=LOCK_WAIT, what=f"luksctl setup ({lock_file})"):
            report = run_setup(options, stdin, progress)
        exit_code = EXIT_OK
    except LuksctlError as exc:
        log.error("%s", exc.detail() if isinstance(exc, CommandFailed) else exc.message)
        report.error, exit_code, error_class = exc.message, exc.exit_code, exc.__class__.__name__
    except Exception as exc:  # answer in the same shape, and audit
        log.error("unexpected error: %s", exc.__class__.__name__)
        report.error, exit_code, error_class = f"internal error ({exc.__class__.__name__})", EXIT_COMMAND_FAILED, exc.__class__.__name__
    if not (report.plan and exit_code == EXIT_OK):
        audit.use_syslog()
        audit.record(action=action, client=f"uid {os.environ.get('SUDO_UID', os.getuid())}", outcome="ok" if exit_code == EXIT_OK else "error",
                     status=exit_code, duration_ms=(time.monotonic() - started) * 1000, error_class=error_class,
                     volume=report.device, vault_path=vault_path)
    if json_output:
        print(json.dumps({"event": "result", **{k: v for k, v in asdict(report).items() if v is not None}}), flush=True)
    else:
        print_text(report, sys.stdout)
    return exit_code
