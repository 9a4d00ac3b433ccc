"""`make demo`: the dashboard's unlock flow against the real stack, step by step.

Runs inside the VM as root (scripts/vm-run.sh demo): a file-backed LUKS volume,
a real OpenBao holding its passphrase the dashboard's way, the API over HTTPS
as deploy/luksctl-api.service starts it, then the dashboard's calls.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))

from helpers_vm import MOUNTPOINT, Dashboard, run, single_vm_config, single_vm_stack  # noqa: E402

PASSPHRASE = "demo: correct horse battery staple"
SUB, DEPLOYMENT = "demo-user-sub", "6f1c2a9e-demo-deployment"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def show(method: str, url: str, body: dict | None, reply) -> None:
    shown = dict(body or {})
    if "vault_token" in shown:
        shown["vault_token"] = "<wrapping token>"  # a demo prints no part of a secret either
    print(f"> {method} {url}" + (f"\n> {json.dumps(shown)}" if body else ""))
    print(f"< {reply.response.status_code} {reply.response.text.strip()}", flush=True)


def main() -> int:
    with single_vm_stack() as (volumes, bao, api):
        step("1. a file-backed LUKS2 volume on a loop device, described in /etc/luks/luks-cryptdev.ini")
        volumes(PASSPHRASE)
        print(Path("/etc/luks/luks-cryptdev.ini").read_text())

        step("2. OpenBao (a real Vault) with the passphrase where the dashboard keeps it")
        bao.start()
        secret_path = bao.store_passphrase(SUB, DEPLOYMENT, PASSPHRASE)
        print(f"KV v2 at secrets/, path {secret_path}, key storage_encryption_key ({bao.url})")

        step("3. luksctl-api over HTTPS, as deploy/luksctl-api.service starts it (user luksctl_api)")
        api.start(single_vm_config(bao))
        print(" ".join(api.unit.exec_start))
        dashboard = Dashboard(api.base_url)
        status_url = f"{api.base_url}/luksctl_api/v1.0/status"
        open_url = f"{api.base_url}/luksctl_api/v1.0/open"

        step("4. the dashboard polls status")
        show("GET", status_url, None, dashboard.status())

        step("5. the dashboard makes a single-use wrapping token (read-only policy) and asks to open")
        payload = bao.open_payload(secret_path)
        started = time.monotonic()
        reply = dashboard.open(payload)
        show("POST", open_url, payload, reply)
        print(f"(open took {time.monotonic() - started:.1f} s under software emulation)")

        step("6. status again")
        reply = dashboard.status()
        show("GET", status_url, None, reply)

        step("7. the same request again: the volume is mounted, so the API answers at once and contacts no Vault")
        show("POST", open_url, payload, dashboard.open(payload))

        step("8. the volume as the kernel sees it")
        print(run("findmnt", str(MOUNTPOINT)).stdout.decode())
        print(run("/usr/local/sbin/luksctl", "status").stdout.decode())

        step("9. the service's audit trail (its stdout, which journald keeps)")
        print(api.stdout_log.read_text().strip())
        return 0 if reply.state == "mounted" else 1


if __name__ == "__main__":
    sys.exit(main())
