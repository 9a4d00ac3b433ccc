"""`luksctl-api` and `luksctl-api-wn`: admin commands next to the gunicorn services."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from pathlib import Path

from ..config import FrontendConfig, WorkerConfig, api_config_path, load_json_config, require_private_directory
from ..durable import write_atomically
from ..errors import EXIT_CONFIG, EXIT_USAGE, LuksctlError
from . import certs, proxy


def _main(argv: list[str] | None, prog: str, model: type, default_owner: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=f"Admin commands for the {prog} service (gunicorn runs the service itself).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser("gen-cert", help="write the self-signed TLS certificate and key the proxy serves")
    gen.add_argument("--cert", type=Path, default=certs.CERT_FILE, help="default: %(default)s")
    gen.add_argument("--key", type=Path, default=certs.KEY_FILE, help="default: %(default)s (mode 0600)")
    gen.add_argument("--owner", default="root", help="user that owns the key; nginx's master reads it as root (default: %(default)s)")
    gen.add_argument("--hostname", action="append", help="DNS name for the certificate (repeatable; default: this host's names)")
    gen.add_argument("--ip", action="append", default=[], help="extra IP address for the certificate (this host's are always included)")
    gen.add_argument("--days", type=int, default=3650, help="validity (default: %(default)s)")
    gen.add_argument("--force", action="store_true", help="replace an existing certificate")
    commands.add_parser("check-config", help=f"validate the config file ($LUKSCTL_API_CONFIG or {api_config_path()})")
    site = commands.add_parser("proxy-config", help="write nginx's configuration for the proxy in front of this service, from the config file")
    site.add_argument("--output", type=Path, help="write here, atomically (default: standard output)")
    site.add_argument("--listen", default=proxy.LISTEN, help="address:port (default: %(default)s)")
    site.add_argument("--socket", type=Path, default=Path(f"/run/{prog}/gunicorn.sock"), help="gunicorn's Unix socket (default: %(default)s)")
    site.add_argument("--runtime-dir", type=Path, default=Path(f"/run/{prog}-proxy"), help="nginx's pid and temporary paths (default: %(default)s)")
    site.add_argument("--user", default=proxy.USER, help="nginx's worker user (default: %(default)s)")
    site.add_argument("--cert", type=Path, default=certs.CERT_FILE, help="default: %(default)s")
    site.add_argument("--key", type=Path, default=certs.KEY_FILE, help="default: %(default)s")
    if model is FrontendConfig:
        write = commands.add_parser("write-config", help="print a new config.json: a sample with the Vault URLs that open may contact")
        write.add_argument("--sample", type=Path, required=True, help="deploy/config/<profile>.json")
        write.add_argument("--vault-url", action="append", default=[], help="a Vault URL callers may name (repeatable)")
    args = parser.parse_args(argv)

    if args.command == "write-config":
        return _write_config(prog, args.sample, args.vault_url)

    if args.command == "proxy-config":
        return _proxy_config(prog, model, args)

    if args.command == "check-config":
        path = api_config_path()
        try:
            config = load_json_config(model, path)
            if model is FrontendConfig:
                require_private_directory(Path(config.LOCK_FILE).parent, _uid_of(default_owner))
        except LuksctlError as exc:
            print(f"{prog}: {exc.message}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"{path}: OK {json.dumps(config.as_dict(), default=str)}")
        return 0

    if args.cert.exists() and not args.force:
        print(f"{prog}: {args.cert} exists; use --force to replace it", file=sys.stderr)
        return EXIT_USAGE
    try:
        certs.write_certificate(
            args.cert, args.key, hostnames=args.hostname or certs.default_hostnames(), extra_addresses=args.ip, owner=args.owner, days=args.days
        )
    except (OSError, KeyError, ValueError) as exc:
        print(f"{prog}: cannot write the certificate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote {args.cert} and {args.key} (owner {args.owner}, mode 0600)")
    return 0


def _uid_of(user: str) -> int:
    """The service user's uid; where it does not exist (a check before install), whoever runs the check."""
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return os.geteuid()


def _proxy_config(prog: str, model: type, args: argparse.Namespace) -> int:
    try:
        config = load_json_config(model, api_config_path())
    except LuksctlError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    cert, key = args.cert, args.key
    if not (cert.exists() and key.exists()):
        # The old tool fell back to plain HTTP when its certificate was missing; we refuse instead.
        if not config.ALLOW_PLAIN_HTTP:
            print(f"{prog}: refusing to serve plain HTTP: {cert} or {key} is missing (run `{prog} gen-cert`), "
                  "or set ALLOW_PLAIN_HTTP in config.json", file=sys.stderr)
            return EXIT_CONFIG
        cert = key = None
    site = proxy.ProxySite(service=prog, state_key="volume_state" if model is FrontendConfig else "nfs_state",
                           upstream_socket=args.socket, runtime_dir=args.runtime_dir, cert=cert, key=key,
                           listen=args.listen, user=args.user)
    text = proxy.nginx_config(site, config)
    if args.output is None:
        sys.stdout.write(text)
    else:
        write_atomically(args.output, text.encode(), mode=0o644)
    return 0


def _write_config(prog: str, sample: Path, vault_urls: list[str]) -> int:
    """install.sh's fresh config.json on stdout: the sample's VAULT_URL_ALLOWLIST (an example)
    replaced by the URLs given, or dropped, so that open is refused until the operator sets it."""
    try:
        config = json.loads(sample.read_text())
        config.pop("VAULT_URL_ALLOWLIST", None)
        if vault_urls:
            config["VAULT_URL_ALLOWLIST"] = vault_urls
        FrontendConfig(**config)
    except (OSError, ValueError, TypeError) as exc:  # InvalidSettings is a ValueError that names each key
        print(f"{prog}: {sample}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not vault_urls:
        print(
            f"{prog}: note: no --vault-url given: open is refused until VAULT_URL_ALLOWLIST is set in config.json "
            "(or ALLOW_ANY_VAULT_URL: true, which lets callers name any URL)",
            file=sys.stderr,
        )
    print(json.dumps(config, indent=2))
    return 0


def main_frontend(argv: list[str] | None = None) -> int:
    return _main(argv, "luksctl-api", FrontendConfig, "luksctl_api")


def main_worker(argv: list[str] | None = None) -> int:
    return _main(argv, "luksctl-api-wn", WorkerConfig, "luksctl_api_wn")
