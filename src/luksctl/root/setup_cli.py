"""The command line of `luksctl setup`: its arguments, the options they make, its answer.

cli.py runs it (setup_handler) like every other command; `fastluks` builds the same
SetupOptions from pyluks' arguments and prints the same answer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import BinaryIO, TextIO

from ..config import VOLUME_INI
from ..errors import UsageError
from ..secret_input import read_passphrase
from . import cryptsetup
from .keystore_options import add_vault_arguments, read_vault_token, secret_ref
from .setup import SetupOptions, VaultTarget


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
    """Reads the passphrase (--passphrase-stdin) and the token here, before setup takes its lock."""
    token_source = args.wrapping_token_file or args.token_file
    if args.passphrase_stdin and token_source == "-":
        raise UsageError("stdin cannot carry both the passphrase and the token: put the token in a file")
    if bool(args.vault_url) != bool(args.secret_path):
        raise UsageError("--vault-url and --secret-path go together")
    if token_source and not args.vault_url:
        raise UsageError("a token was given but no Vault location (--vault-url, --secret-path)")
    ref = secret_ref(args) if args.vault_url else None  # a bad path is refused before anything is read
    passphrase = read_passphrase(stdin, is_tty=False) if args.passphrase_stdin else None
    vault = None
    if ref is not None:
        vault = VaultTarget(args.vault_url, ref, args.token_file is None, args.vault_ca_bundle, args.vault_timeout, read_vault_token(args, stdin),
                            args.vault_allow_http)
    return SetupOptions(
        device=args.device, cryptdev=args.cryptdev, mountpoint=args.mountpoint, filesystem=args.filesystem,
        cipher=args.cipher, key_size=args.key_size, hash=args.hash, pbkdf=args.pbkdf, iter_time=args.iter_time,
        pbkdf_force_iterations=args.pbkdf_force_iterations, passphrase_length=args.passphrase_length,
        passphrase=passphrase, vault=vault, wipe=args.wipe, dry_run=args.dry_run, force=args.force,
        ini_path=args.cryptdev_file, header_path=args.header_backup_file,
    )


def print_result(result: dict, json_output: bool, out: TextIO) -> None:
    """setup's answer: a last JSON line ("event": "result") or one line of text."""
    if json_output:
        print(json.dumps({"event": "result", **{key: value for key, value in result.items() if value is not None}}), file=out, flush=True)
    elif result["plan"]:
        print("Plan (nothing was changed):", file=out)
        for number, step in enumerate(result["plan"], 1):
            print(f"  {number}. {step}", file=out)
    elif result["error"]:
        print(f"Setup of {result['device']}: [ FAIL ] {result['error']}", file=out)
    else:
        what = "already set up, nothing to do" if not result["changed"] else f"encrypted (LUKS UUID {result['uuid']}) and {result['volume_state']}"
        print(f"Setup of {result['device']}: [ OK ] {what}", file=out)
