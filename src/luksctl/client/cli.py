"""luksctl-client: `status` of many hosts, `open` of one, `forget` a recorded certificate.

Exit status: 0 when every host answered (status) or the volume is mounted (open); 1 when a host
failed (no answer in time, certificate refused, an error in its answer) or the open did not
mount; 2 for a usage error (bad arguments, no Vault token, no ansible-inventory).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import vault
from ..errors import LuksctlError
from .pinning import KnownHosts, Trust, TrustError, default_known_hosts
from .transport import DEFAULT_PORT, HostFailed, Target, exchange, parse_target

PROG = "luksctl-client"
FRONTEND_STATUS = "/luksctl_api/v1.0/status"
WORKER_STATUS = "/luksctl_api_wn/v1.0/status"
OPEN = "/luksctl_api/v1.0/open"
STATE_KEYS = ("volume_state", "nfs_state")
MAX_PARALLEL = 64
INVENTORY_TIMEOUT = 60.0
PROGRESS_EVERY = 5.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PORT_VARIABLE = "luksctl_api_port"  # an inventory host's API port, when not 5000


class UsageProblem(Exception):
    pass


def say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")  # one write: status's threads do not interleave lines
    sys.stderr.flush()


# --- status ----------------------------------------------------------------------------------


def host_status(target: Target, trust: Trust, timeout: float) -> dict:
    """One row: the host and its state, or the reason it has none. A worker answers 404 at the
    front end's path, so it is asked at its own; both under the same deadline."""
    row: dict = {"host": str(target)}
    try:
        with vault.Deadline(timeout) as deadline:
            status, body = exchange(target, "GET", FRONTEND_STATUS, trust=trust, deadline=deadline, timeout=timeout)
            if status == 404:
                status, body = exchange(target, "GET", WORKER_STATUS, trust=trust, deadline=deadline, timeout=timeout)
    except HostFailed as exc:
        row["error"] = str(exc)
        return row
    row.update({key: body[key] for key in STATE_KEYS if isinstance(body.get(key), str)})
    if status != 200 or body.get("error"):
        row["error"] = str(body.get("error") or f"HTTP {status}")
    return row


def inventory_hosts(inventory: str) -> list[Target]:
    """Every host of an Ansible inventory, parsed by Ansible itself: its ansible_host (else its
    name) and its PORT_VARIABLE (else 5000). It runs on the user's own
    PATH and environment (the user's tool, as the user), so not through luksctl.runner."""
    binary = shutil.which("ansible-inventory")
    if binary is None:
        raise UsageProblem("-i needs ansible-inventory, which is not on PATH: install ansible-core (e.g. `pipx install ansible-core`)")
    try:
        done = subprocess.run([binary, "-i", inventory, "--list"], capture_output=True, text=True, timeout=INVENTORY_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageProblem(f"ansible-inventory did not finish within {INVENTORY_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise UsageProblem(f"ansible-inventory -i {inventory} failed: {done.stderr.strip()[-500:]}")
    groups = json.loads(done.stdout)
    hostvars = groups.get("_meta", {}).get("hostvars", {})
    names = {host for name, group in groups.items() if name != "_meta" for host in group.get("hosts", [])}
    if not names:
        raise UsageProblem(f"the inventory {inventory} has no hosts")
    targets = []
    for name in sorted(names):
        variables = hostvars.get(name, {})
        targets.append(Target(variables.get("ansible_host", name), int(variables.get(PORT_VARIABLE, DEFAULT_PORT))))
    return targets


def print_table(rows: list[dict]) -> None:
    columns = ("host", *STATE_KEYS, "error")
    lines = [[column.upper() for column in columns]] + [[str(row.get(column, "-")) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])


def run_status(args, trust: Trust) -> int:
    targets = [parse_target(text) for text in args.hosts]
    if args.inventory:
        targets += inventory_hosts(args.inventory)
    if not targets:
        raise UsageProblem("name at least one HOST[:PORT], or an inventory with -i")
    with ThreadPoolExecutor(max_workers=min(len(targets), MAX_PARALLEL)) as pool:
        rows = list(pool.map(lambda target: host_status(target, trust, args.timeout), targets))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return EXIT_FAILED if any("error" in row for row in rows) else EXIT_OK


# --- open ------------------------------------------------------------------------------------


def vault_token() -> str:
    """Where the `vault` CLI finds it: VAULT_TOKEN, else ~/.vault-token."""
    token = os.environ.get("VAULT_TOKEN", "").strip()
    if not token:
        try:
            token = (Path.home() / ".vault-token").read_text().strip()
        except FileNotFoundError:
            pass
    if not token:
        raise UsageProblem("no Vault token: log in with `vault login` (or `bao login`), or set VAULT_TOKEN")
    return token


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wrapping_token(vault_addr: str, policy: str, wrap_ttl: str, timeout: float) -> str:
    # Plain http:// only to this machine itself (a dev server): elsewhere the token would cross a network.
    client = vault.VaultClient(vault_addr, token=vault_token(), ca_bundle=os.environ.get("VAULT_CACERT") or None,
                               timeout=timeout, allow_http=is_loopback(vault_addr))
    return client.create_wrapped_token(policy, wrap_ttl)


def waiting_notice(target: Target, done: threading.Event) -> None:
    waited = 0.0
    while not done.wait(PROGRESS_EVERY):
        waited += PROGRESS_EVERY
        say(f"still waiting for {target} to open the volume ({waited:g} s)")


def run_open(args, trust: Trust) -> int:
    target = parse_target(args.host)
    vault_addr = os.environ.get("VAULT_ADDR", "").strip()
    if not vault_addr:
        raise UsageProblem("VAULT_ADDR is not set: export the address of your Vault, as for the vault CLI")
    say(f"asking Vault at {vault_addr} for a single-use wrapping token (policy {args.policy}, wrap TTL {args.wrap_ttl})")
    body = {"vault_url": args.vault_url or vault_addr, "vault_token": wrapping_token(vault_addr, args.policy, args.wrap_ttl, args.timeout),
            "secret_root": args.secret_root, "secret_path": args.secret_path, "secret_key": args.secret_key}
    say(f"asking {target} to open and mount its volume")
    done = threading.Event()
    threading.Thread(target=waiting_notice, args=(target, done), daemon=True).start()
    try:
        with vault.Deadline(args.timeout) as deadline:
            status, answer = exchange(target, "POST", OPEN, trust=trust, deadline=deadline, timeout=args.timeout, body=body)
    except HostFailed as exc:
        say(f"{target}: {exc}")
        return EXIT_FAILED
    finally:
        done.set()
    state = answer.get("volume_state", "unknown")
    print(f"{target}  volume_state {state}")
    if status != 200 or state != "mounted":
        say(f"{target}: {answer.get('error') or f'HTTP {status}'}")
        return EXIT_FAILED
    return EXIT_OK


# --- the front door --------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description="Status and open of luksctl hosts from your own machine.",
                                  epilog="Exit status: 0 all well; 1 a host failed or the open did not mount; 2 usage error.")
    top.add_argument("--ca", metavar="FILE", help="verify servers against this CA bundle (host name included) instead of pinning")
    top.add_argument("--known-hosts", metavar="FILE", type=Path, default=default_known_hosts(),
                     help="pinned certificate fingerprints, recorded on first use (default: %(default)s)")
    commands = top.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="the state of many hosts, asked in parallel")
    status.add_argument("hosts", nargs="*", metavar="HOST[:PORT]", help="default port 5000")
    status.add_argument("-i", "--inventory", help="also every host of this Ansible inventory (needs ansible-inventory)")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds per host (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    opener = commands.add_parser("open", help="open and mount a host's volume with a wrapping token made from your Vault token",
                                 description="Uses VAULT_ADDR, VAULT_TOKEN or ~/.vault-token, and VAULT_CACERT, as the vault CLI does.")
    opener.add_argument("host", metavar="HOST[:PORT]")
    opener.add_argument("--secret-path", required=True, help="e.g. <user-sub>/<deployment-uuid>/storage_encryption")
    opener.add_argument("--secret-root", default="secrets", help="KV mount (default: %(default)s)")
    opener.add_argument("--secret-key", default="storage_encryption_key", help="default: %(default)s")
    opener.add_argument("--policy", default="luksctl-read", help="the read-only policy of the wrapped token (default: %(default)s)")
    opener.add_argument("--wrap-ttl", default="300s", help="how long the wrapping token lives unused (default: %(default)s)")
    opener.add_argument("--vault-url", help="Vault's address as the host reaches it (default: VAULT_ADDR)")
    opener.add_argument("--timeout", type=float, default=300.0, help="seconds for Vault and for the open (default: %(default)s)")
    forget = commands.add_parser("forget", help="drop a host's recorded certificate, to accept a new one on the next connection")
    forget.add_argument("host", metavar="HOST[:PORT]")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        known_hosts = KnownHosts(args.known_hosts, say)
        if args.command == "forget":
            target = parse_target(args.host)
            if not known_hosts.forget(str(target)):
                say(f"{target} is not in {args.known_hosts}")
                return EXIT_FAILED
            say(f"forgot {target}'s certificate; the next connection records the one it presents")
            return EXIT_OK
        trust = Trust(known_hosts, args.ca)
        return run_status(args, trust) if args.command == "status" else run_open(args, trust)
    except (UsageProblem, TrustError, ValueError) as exc:
        say(str(exc))
        return EXIT_USAGE
    except LuksctlError as exc:  # Vault's answer to the token create: safe to show by design
        say(exc.message)
        return EXIT_FAILED
