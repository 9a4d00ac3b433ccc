"""`make demo`: the whole lifecycle against the real stack, from a blank disk, step by step.

Runs inside the VM as root (scripts/vm-run.sh demo): a blank loop device, a real OpenBao laid
out the dashboard's way, `luksctl setup` with the dashboard's write-only wrapping token (as at
deployment time), then the API over HTTPS as deploy/luksctl-api.service starts it, and the
dashboard's unlock flow with a read-only wrapping token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))

from helpers_vm import CRYPTSETUP, MOUNTPOINT, SERVICE_PATH, VOLUME_INI, Dashboard, run, single_vm_config, single_vm_stack  # noqa: E402

SUB, DEPLOYMENT = "demo-user-sub", "6f1c2a9e-demo-deployment"
SECRET_PATH = f"{SUB}/{DEPLOYMENT}/storage_encryption"
LUKSCTL = "/usr/local/sbin/luksctl"
BLANK_IMAGE = Path("/srv/luks-test/demo-blank.img")
TOKEN_FILE = Path("/run/demo-wrapping-token")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def show(method: str, url: str, body: dict | None, reply) -> None:
    shown = dict(body or {})
    if "vault_token" in shown:
        shown["vault_token"] = "<wrapping token>"  # a demo prints no part of a secret either
    print(f"> {method} {url}" + (f"\n> {json.dumps(shown)}" if body else ""))
    print(f"< {reply.response.status_code} {reply.response.text.strip()}", flush=True)


def blank_disk() -> str:
    BLANK_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    BLANK_IMAGE.unlink(missing_ok=True)
    with BLANK_IMAGE.open("xb") as f:
        f.truncate(64 * 1024 * 1024)
    return run("losetup", "--find", "--show", str(BLANK_IMAGE)).stdout.decode().strip()


def main() -> int:
    loop = None
    with single_vm_stack() as (_volumes, bao, api):
        try:
            step("1. a blank 64 MiB disk (a loop device), nothing on it")
            loop = blank_disk()
            print(run("blkid", "-p", loop, check=False).stdout.decode() or f"{loop}: blkid finds no signature")

            step("2. OpenBao (a real Vault), and the deployment-time token the dashboard hands the VM")
            bao.start()
            token = bao.write_only_wrapping_token()
            TOKEN_FILE.write_text(token + "\n")
            TOKEN_FILE.chmod(0o600)
            print(f"policy write_only: create on secrets/data/*; wrapping token (wrap TTL 1h) in {TOKEN_FILE}")

            step("3. luksctl setup: save the passphrase, store it in Vault, format, back up, mkfs, mount")
            # Fast PBKDF for the demo under software emulation; production keeps argon2id.
            argv = [LUKSCTL, "setup", "--device", loop, "--cryptdev", "demo", "--mountpoint", str(MOUNTPOINT),
                    "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                    "--vault-url", bao.url, "--vault-allow-http", "--secret-path", SECRET_PATH, "--wrapping-token-file", str(TOKEN_FILE)]
            print("$ " + " ".join(argv))
            started = time.monotonic()
            result = subprocess.run(argv, capture_output=True, env={"PATH": SERVICE_PATH}, timeout=600)
            print(result.stderr.decode() + result.stdout.decode(), end="")
            print(f"(setup took {time.monotonic() - started:.1f} s under software emulation; exit {result.returncode})")
            if result.returncode != 0:
                return 1
            print(VOLUME_INI.read_text())
            for path in ("/var/run/fast-luks-encryption.success", "/var/run/fast-luks-volume-setup.success"):
                print(f"{path}: {Path(path).read_text()}")

            step("4. close it, as after a reboot; udev would make /dev/disk/by-uuid (the VM has none)")
            print(run(LUKSCTL, "close").stdout.decode(), end="")
            uuid = run(CRYPTSETUP, "luksUUID", loop).stdout.decode().strip()
            link = Path("/dev/disk/by-uuid") / uuid
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(Path("../..") / Path(loop).name)

            step("5. luksctl-api over HTTPS, as deploy/luksctl-api.service starts it (user luksctl_api)")
            api.start(single_vm_config(bao))
            print(" ".join(api.unit.exec_start))
            dashboard = Dashboard(api.base_url)
            status_url = f"{api.base_url}/luksctl_api/v1.0/status"
            open_url = f"{api.base_url}/luksctl_api/v1.0/open"

            step("6. the dashboard polls status")
            show("GET", status_url, None, dashboard.status())

            step("7. the dashboard makes a single-use wrapping token (read-only policy) and asks to open")
            payload = bao.open_payload(SECRET_PATH)
            started = time.monotonic()
            reply = dashboard.open(payload)
            show("POST", open_url, payload, reply)
            print(f"(open took {time.monotonic() - started:.1f} s under software emulation)")

            step("8. status again")
            reply = dashboard.status()
            show("GET", status_url, None, reply)

            step("9. the volume as the kernel sees it")
            print(run("findmnt", str(MOUNTPOINT)).stdout.decode())
            print(run(LUKSCTL, "status").stdout.decode())

            step("10. the service's audit trail (its stdout, which journald keeps)")
            print(api.stdout_log.read_text().strip())
            return 0 if reply.state == "mounted" else 1
        finally:
            TOKEN_FILE.unlink(missing_ok=True)
            api.stop()
            if Path("/dev/mapper/demo").exists():
                run("umount", str(MOUNTPOINT), check=False)
                run(CRYPTSETUP, "close", "demo", check=False)
            for path in (VOLUME_INI, Path("/etc/luks/luks-header.bck"), Path("/etc/luks/luks-header.bck.sha256")):
                path.unlink(missing_ok=True)
            if loop:
                run("losetup", "--detach", loop, check=False)
            BLANK_IMAGE.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
