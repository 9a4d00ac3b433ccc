"""README, Audit: one JSON line per open, close, nfs-mount and refused request, read back from the
journal that systemd's units write to. The services' lines come from their stdout; the CLI's from
syslog (facility authpriv, tag `luksctl`, `client` = `uid <SUDO_UID>`). Every line is parsed and
compared whole, not searched for a substring.

The journal is read once, unfiltered, after a cursor, and selected here by the fields that
`journalctl -u` and `-t` match on: journalctl (systemd 252, Debian 12) with `--after-cursor` and a
match skips the first matching entry whenever the cursor's own entry does not match (it steps
twice, to get past the cursor entry it assumes it landed on; systemd issue #30288, fixed in 255 by
PR #30336). That is how the API's `sudo luksctl open` line went missing from `journalctl
--identifier=luksctl --after-cursor=...` while the same query without the cursor listed it."""

from __future__ import annotations

import datetime
import json
import pwd
import shutil
from pathlib import Path

import pytest
import requests
from helpers_vm import LUKS_DIR, OUT, REPO, run, unverified_request, wait_until

API_UNIT = "luksctl-api.service"
WORKER_UNIT = "luksctl-api-wn.service"
LUKSCTL = "/usr/local/sbin/luksctl"
WORKER_URL = "https://127.0.0.1:5000/luksctl_api_wn/v1.0"
CLUSTER_TOKEN = LUKS_DIR / "cluster-token"
# The fields README's example and list name; nothing else may appear in a line.
DOCUMENTED = {"audit", "time", "client", "action", "outcome", "status", "duration_ms", "volume", "vault_path",
              "nodes", "fanout", "error_class", "alert"}
LOG_AUTHPRIV = 10


def cursor() -> str:
    return json.loads(run("journalctl", "--lines=1", "--output=json", "--no-pager").stdout.splitlines()[-1])["__CURSOR"]


def journal_after(start: str) -> list[dict]:
    """Every record after the cursor, with no match (see the module's docstring)."""
    run("journalctl", "--sync")
    lines = run("journalctl", "--no-pager", "--output=json", f"--after-cursor={start}").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert records and records[0]["__CURSOR"] != start
    return records


def message(record: dict) -> str:
    text = record["MESSAGE"]
    return bytes(text).decode() if isinstance(text, list) else text  # journald gives non-UTF-8 as bytes


def audit_line(text: str) -> dict:
    entry = json.loads(text)
    assert entry["audit"] == "luksctl" and set(entry) <= DOCUMENTED, entry
    assert datetime.datetime.fromisoformat(entry["time"]).tzinfo is not None, entry
    assert isinstance(entry["duration_ms"], float | int) and entry["duration_ms"] >= 0, entry
    return entry


def cli_lines(records: list[dict]) -> list[dict]:
    """`journalctl -t luksctl`: each record the CLI's audit line, sent to syslog at authpriv."""
    tagged = [record for record in records if record.get("SYSLOG_IDENTIFIER") == "luksctl"]
    for record in tagged:
        assert (record["_TRANSPORT"], record["SYSLOG_FACILITY"], record["_UID"]) == ("syslog", str(LOG_AUTHPRIV), "0"), record
    return [audit_line(message(record)) for record in tagged]


def service_lines(records: list[dict], unit: str) -> list[dict]:
    """The service's own audit lines: JSON objects on its stdout (gunicorn logs plain text there)."""
    own = [record for record in records if record.get("_SYSTEMD_UNIT") == unit and record["_TRANSPORT"] == "stdout"]
    return [audit_line(message(record)) for record in own if message(record).startswith("{")]


def every_audit_line(records: list[dict]) -> list[str]:
    return [message(record) for record in records if message(record).startswith('{"audit"')]


def pick(entry: dict, *keys: str) -> tuple:
    return tuple(entry.get(key) for key in keys)


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def test_open_close_and_a_refused_open_each_leave_exactly_one_audit_line(frontend, systemd, bao_up, luks_volume):
    volume = luks_volume()
    dashboard = frontend({"INFRASTRUCTURE_CONFIGURATION": "single_vm", "VAULT_URL_ALLOWLIST": [bao_up.url], "ALLOW_PLAIN_HTTP": True})
    secret_path = bao_up.store_passphrase("audit-sub", volume.uuid, volume.passphrase.decode())
    start = cursor()

    assert dashboard.open(bao_up.open_payload(secret_path)).state == "mounted"
    assert dashboard.open({"vault_url": bao_up.url}).response.status_code == 400
    assert dashboard.status().state == "mounted"  # a status poll: no line
    assert run("sudo", LUKSCTL, "close").returncode == 0  # an operator's close, as README shows it

    records = journal_after(start)
    opened, refused = service_lines(records, API_UNIT)
    assert pick(opened, "client", "action", "outcome", "status", "volume", "vault_path") == (
        "127.0.0.1", "open", "ok", 200, volume.cryptdev,
        f"secrets/{secret_path} (key 'storage_encryption_key') at {bao_up.url}")
    assert pick(refused, "client", "action", "outcome", "status", "error_class") == (
        "127.0.0.1", "open", "denied", 400, "BadRequest")
    assert [pick(entry, "action", "client", "outcome", "status") for entry in cli_lines(records)] == [
        ("open", f"uid {uid('luksctl_api')}", "ok", 0),  # the API's `sudo -n luksctl --json open`
        ("close", "uid 0", "ok", 0),
    ]
    # Nothing else: four requests, four lines (the CLI's line under the API's unit is the same record).
    assert len(every_audit_line(records)) == 4, every_audit_line(records)
    assert len([r for r in records if r.get("_SYSTEMD_UNIT") == API_UNIT and r.get("SYSLOG_IDENTIFIER") == "luksctl"]) == 1


@pytest.fixture
def worker(systemd, api_unit, frontend):
    """deploy/luksctl-api-wn.service, unchanged, behind its proxy on the port the API's proxy leaves
    free (stopping the API stops it: PartOf=); it shares /etc/luks with the API (the certificate
    and key, read by nginx's master as root), and its token is removed after."""
    frontend({"INFRASTRUCTURE_CONFIGURATION": "single_vm"})  # for its certificate
    systemd.systemctl("stop", api_unit)
    systemd.install(WORKER_UNIT, (REPO / "deploy" / WORKER_UNIT).read_text())
    token = "audit-cluster-token"
    CLUSTER_TOKEN.write_text(token)
    CLUSTER_TOKEN.chmod(0o640)
    shutil.chown(CLUSTER_TOKEN, "root", "luksctl_api_wn")
    # A share that no fstab entry mounts: the remount runs, and the share stays unmounted.
    share = str(OUT / "audit-nfs-share")
    (LUKS_DIR / "config.json").write_text(json.dumps({"NFS_MOUNTPOINT_LIST": [share]}))
    systemd.systemctl("restart", WORKER_UNIT)

    def answers() -> bool:
        try:
            return unverified_request("GET", f"{WORKER_URL}/status", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, 120, f"{WORKER_UNIT} on {WORKER_URL}")
    yield token, share
    systemd.save_journal(WORKER_UNIT)
    systemd.systemctl("stop", WORKER_UNIT, check=False)
    CLUSTER_TOKEN.unlink()


def test_an_nfs_mount_and_a_refused_one_each_leave_exactly_one_audit_line(worker):
    token, share = worker
    start = cursor()

    remount = unverified_request("POST", f"{WORKER_URL}/nfs-mount", headers={"X-Luksctl-Token": token}, timeout=120)
    assert (remount.status_code, remount.json()["nfs_state"]) == (502, "unmounted"), remount.text
    refused = unverified_request("POST", f"{WORKER_URL}/nfs-mount", timeout=30)
    assert (refused.status_code, refused.json()["nfs_state"]) == (403, "unmounted"), refused.text

    records = journal_after(start)
    assert [pick(entry, "client", "action", "outcome", "status", "error_class") for entry in service_lines(records, WORKER_UNIT)] == [
        ("127.0.0.1", "nfs-mount", "error", 502, "NfsMountIncomplete"),
        ("127.0.0.1", "nfs-mount", "denied", 403, "CallerRefused"),
    ]
    # The worker's `sudo -n luksctl --json nfs-mount`: exit 1, a share still unmounted.
    assert [pick(entry, "action", "client", "outcome", "status") for entry in cli_lines(records)] == [
        ("nfs-mount", f"uid {uid('luksctl_api_wn')}", "error", 1),
    ]
    assert len(every_audit_line(records)) == 3, every_audit_line(records)
    assert not Path(share).is_mount()
