"""`fastluks`: pyluks 0.0.2's command line, so deployed Ansible roles run unchanged.

It runs `luksctl setup` with the older tools' defaults (256-bit key, sha256,
--iter-time 2000). The one difference from `luksctl setup` that matters:
pyluks takes the wrapping token (and -p, the passphrase) in argv, where
/proc/<pid>/cmdline shows them to every local user while it runs. We accept
that because the role passes them there; they never reach a log line, and
--wrapping-token-file is offered as the safe way (README, "Encrypting a volume").
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import BinaryIO

from ..config import VOLUME_INI
from ..errors import UsageError
from ..secret_input import read_token
from ..vault import SecretRef
from . import cryptsetup
from .cli import Paths, Request, _Parser, run_command, setup_handler
from .setup import SetupOptions, VaultTarget

VERSION = "luksctl fastluks (pyluks 0.0.2 command line)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastluks", description="Encrypt a volume as pyluks' fastluks did, with luksctl setup underneath.")
    parser.add_argument("--device", default="/dev/vdb", dest="device_name")
    parser.add_argument("--cryptdev", default="crypt")
    parser.add_argument("-m", "--mountpoint", default="/export")
    parser.add_argument("-f", "--filesystem", default="ext4")
    parser.add_argument("-c", "--cipher", default="aes-xts-plain64", dest="cipher_algorithm")
    parser.add_argument("-s", "--key-size", default=256, type=int, dest="keysize")
    parser.add_argument("--hash", default="sha256", dest="hash_algorithm")
    parser.add_argument("--header-backup-file", default=str(cryptsetup.DEFAULT_HEADER_BACKUP), dest="luks_header_backup_file")
    parser.add_argument("--cryptdev-file", default=str(VOLUME_INI), dest="luks_cryptdev_file")
    parser.add_argument("-l", "--passphrase-length", default=64, type=int, dest="passphrase_length")
    parser.add_argument("-p", "--passphrase", default=None, help="visible in the process list while fastluks runs")
    parser.add_argument("--save-passphrase-locally", action="store_true", help="also write the passphrase into the ini file (0600)")
    parser.add_argument("--vault", action="store_true", dest="use_vault", help="store the passphrase in Vault")
    parser.add_argument("--vault-url")
    parser.add_argument("--wrapping-token", help="visible in the process list while fastluks runs; prefer --wrapping-token-file")
    parser.add_argument("--secret-path", help="appended to /v1/secrets/data/")
    parser.add_argument("--user-key", help="the key inside the secret")
    parser.add_argument("-V", "--version", action="store_true")
    # Ours, beyond pyluks: the token from a file or stdin, and a PBKDF cost for tests.
    parser.add_argument("--wrapping-token-file", metavar="FILE", help="the wrapping token from FILE or '-' (stdin), out of argv")
    parser.add_argument("--vault-allow-http", action="store_true", help="accept an http:// Vault URL (tests only)")
    parser.add_argument("--pbkdf", choices=cryptsetup.PBKDF_CHOICES)
    parser.add_argument("--pbkdf-force-iterations", type=int)
    parser.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    return parser


def options_from_args(args: argparse.Namespace, stdin: BinaryIO) -> SetupOptions:
    """Reads --wrapping-token-file here, before setup takes its lock."""
    vault = None
    if args.use_vault:
        missing = [flag for flag, value in (("--vault-url", args.vault_url), ("--secret-path", args.secret_path), ("--user-key", args.user_key)) if not value]
        if not (args.wrapping_token or args.wrapping_token_file):
            missing.append("--wrapping-token")
        if missing:
            raise UsageError(f"--vault needs {', '.join(missing)}")
        if args.wrapping_token and args.wrapping_token_file:
            raise UsageError("give the wrapping token once: --wrapping-token or --wrapping-token-file")
        try:
            ref = SecretRef("secrets", args.secret_path, args.user_key, 2)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        token = read_token(args.wrapping_token_file, stdin) if args.wrapping_token_file else args.wrapping_token
        vault = VaultTarget(args.vault_url, ref, wrapped=True, token=token, allow_http=args.vault_allow_http)
    return SetupOptions(
        device=args.device_name, cryptdev=args.cryptdev, mountpoint=args.mountpoint, filesystem=args.filesystem,
        cipher=args.cipher_algorithm, key_size=args.keysize, hash=args.hash_algorithm,
        pbkdf=args.pbkdf, iter_time=None if args.pbkdf_force_iterations else 2000,
        pbkdf_force_iterations=args.pbkdf_force_iterations, passphrase_length=args.passphrase_length,
        passphrase=args.passphrase.encode() if args.passphrase else None, vault=vault,
        save_passphrase_locally=args.save_passphrase_locally,
        ini_path=Path(args.luks_cryptdev_file), header_path=Path(args.luks_header_backup_file),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="fastluks: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    if args.version:
        print(VERSION)
        return 0
    return run_command(setup_handler(options_from_args), Request(args, Paths(), sys.stdin.buffer, False, {}), "fastluks")
