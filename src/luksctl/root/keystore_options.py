"""The Vault options of the commands that write the stored secret: setup, rotate, decommission.

One definition, so the flags, defaults and help read the same in every command.
"""

from __future__ import annotations

import argparse
from typing import BinaryIO

from ..errors import UsageError
from ..vault import SecretRef, VaultClient
from .setup import read_token


def add_vault_arguments(parser: argparse.ArgumentParser, heading: str, *, required: bool) -> None:
    """Where the secret is and the token that reaches it; the token never comes from argv."""
    vault = parser.add_argument_group(heading)
    vault.add_argument("--vault-url", required=required, help="e.g. https://vault.example:8200")
    vault.add_argument("--secret-root", default="secrets", help="KV mount (default: secrets)")
    vault.add_argument("--secret-path", required=required, help="<user-sub>/<deployment-uuid>/storage_encryption")
    vault.add_argument("--secret-key", default="storage_encryption_key", help="(default: storage_encryption_key)")
    vault.add_argument("--kv-version", type=int, choices=(1, 2), default=2, help="the mount's KV version (default: 2)")
    tokens = vault.add_mutually_exclusive_group(required=required)
    tokens.add_argument("--wrapping-token-file", metavar="FILE", help="a response-wrapping token, from FILE or '-' (stdin)")
    tokens.add_argument("--token-file", metavar="FILE", help="a plain Vault token, from FILE or '-' (stdin)")
    vault.add_argument("--vault-ca-bundle", metavar="FILE", help="CA certificates to verify Vault's TLS certificate with")
    vault.add_argument("--vault-timeout", type=float, default=10.0,
                       help="seconds for the whole Vault exchange, all calls together, however slowly Vault answers (default: 10)")
    vault.add_argument("--vault-allow-http", action="store_true", help="accept an http:// Vault URL (the token then travels unencrypted: tests only)")


def secret_ref(args: argparse.Namespace) -> SecretRef:
    try:
        return SecretRef(args.secret_root, args.secret_path, args.secret_key, args.kv_version)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def open_keystore(args: argparse.Namespace, stdin: BinaryIO) -> VaultClient:
    """A wrapping token is unwrapped here; a plain token is the operator's own, used as given."""
    options = {"ca_bundle": args.vault_ca_bundle, "timeout": args.vault_timeout, "allow_http": args.vault_allow_http}
    if args.wrapping_token_file:
        token = read_token(args.wrapping_token_file, stdin)
        return VaultClient(args.vault_url, **options).unwrap(token)
    token = read_token(args.token_file, stdin)
    return VaultClient(args.vault_url, token=token, **options)
