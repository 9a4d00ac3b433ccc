"""The Vault options of the commands that write the stored secret: setup, rotate, decommission.

One definition, so the flags, defaults and help read the same in every command; and the one
place a Vault client is made for them, which decides which token is revoked afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import UsageError
from ..secret_input import read_token
from ..vault import SecretRef, VaultClient


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


def read_vault_token(args: argparse.Namespace, stdin: BinaryIO) -> str | None:
    """The token of --wrapping-token-file or --token-file (FILE or '-'), read before any lock is taken."""
    source = args.wrapping_token_file or args.token_file
    return read_token(source, stdin) if source else None


@contextlib.contextmanager
def open_keystore(url: str, token: str, *, wrapped: bool, ca_bundle: str | None, timeout: float,
                  allow_http: bool) -> Iterator[VaultClient]:
    """A Vault client for the length of the `with`.

    A wrapping token is unwrapped on entry (so before the caller takes its lock) and the token
    it held is ours: revoked on exit. A plain token is the operator's own, long-lived and maybe
    the parent of others: used as given and never revoked.
    """
    options = {"ca_bundle": ca_bundle, "timeout": timeout, "allow_http": allow_http}
    if not wrapped:
        yield VaultClient(url, token=token, **options)
        return
    client = VaultClient(url, **options).unwrap(token)
    try:
        yield client
    finally:
        client.revoke_self()


def keystore_from_args(args: argparse.Namespace, stdin: BinaryIO):
    """open_keystore for rotate, decommission and reencrypt (which checks its optional ones first)."""
    token = read_vault_token(args, stdin)
    return open_keystore(args.vault_url, token, wrapped=bool(args.wrapping_token_file), ca_bundle=args.vault_ca_bundle,
                         timeout=args.vault_timeout, allow_http=args.vault_allow_http)
