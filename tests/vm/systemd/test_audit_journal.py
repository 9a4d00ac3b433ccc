"""README, Audit: one JSON line per open, close and refused request, read back from the journal
exactly as an operator reads it (`journalctl -u luksctl-api`; the CLI's lines under the syslog
tag `luksctl`, facility authpriv). Parsed and compared whole, not searched for a substring."""

from __future__ import annotations

import datetime
import json
import pwd

from helpers_vm import run

UNIT = "luksctl-api.service"
LUKSCTL = "/usr/local/sbin/luksctl"
# The fields README's example and list name; nothing else may appear in a line.
DOCUMENTED = {"audit", "time", "client", "action", "outcome", "status", "duration_ms", "volume", "vault_path",
              "nodes", "error_class", "alert"}
LOG_AUTHPRIV = 10


def cursor() -> str:
    return json.loads(run("journalctl", "--lines=1", "--output=json", "--no-pager").stdout.splitlines()[-1])["__CURSOR"]


def journal_since(after: str, *selector: str) -> list[dict]:
    run("journalctl", "--sync")
    lines = run("journalctl", "--no-pager", "--output=json", f"--after-cursor={after}", *selector).stdout.splitlines()
    return [json.loads(line) for line in lines]


def audit_entries(records: list[dict]) -> list[dict]:
    """The audit lines among journal records; each must be a documented JSON object."""
    entries = []
    for record in records:
        message = record["MESSAGE"]
        if isinstance(message, list):  # journald gives non-UTF-8 messages as byte lists
            message = bytes(message).decode(errors="replace")
        if not message.startswith('{"audit"'):
            continue
        entry = json.loads(message)
        assert entry["audit"] == "luksctl" and set(entry) <= DOCUMENTED, entry
        assert datetime.datetime.fromisoformat(entry["time"]).tzinfo is not None, entry
        assert isinstance(entry["duration_ms"], float | int) and entry["duration_ms"] >= 0, entry
        entries.append(entry)
    return entries


def pick(entry: dict, *keys: str) -> tuple:
    return tuple(entry.get(key) for key in keys)


def test_open_close_and_a_refused_request_each_leave_exactly_one_audit_line(frontend, bao_up, luks_volume):
    volume = luks_volume()
    dashboard = frontend({"INFRASTRUCTURE_CONFIGURATION": "single_vm", "VAULT_URL_ALLOWLIST": [bao_up.url]})
    secret_path = bao_up.store_passphrase("audit-sub", volume.uuid, volume.passphrase.decode())
    start = cursor()

    assert dashboard.open(bao_up.open_payload(secret_path)).state == "mounted"
    assert dashboard.open({"vault_url": bao_up.url}).response.status_code == 400
    assert dashboard.status().state == "mounted"  # a status poll: no line
    assert run(LUKSCTL, "close").returncode == 0

    # The unit's cgroup also holds the `sudo luksctl` it runs, whose syslog line journald files
    # under the unit too: the service's own lines are those not tagged `luksctl`.
    service = audit_entries([record for record in journal_since(start, f"--unit={UNIT}")
                             if record.get("SYSLOG_IDENTIFIER") != "luksctl"])
    assert len(service) == 2, service
    opened, refused = service
    assert pick(opened, "client", "action", "outcome", "status", "volume", "vault_path") == (
        "127.0.0.1", "open", "ok", 200, volume.cryptdev,
        f"secrets/{secret_path} (key 'storage_encryption_key') at {bao_up.url}")
    assert pick(refused, "client", "action", "outcome", "status") == ("127.0.0.1", "open", "denied", 400)

    cli_records = journal_since(start, "--identifier=luksctl")
    assert {record["SYSLOG_FACILITY"] for record in cli_records} == {str(LOG_AUTHPRIV)}, cli_records
    cli = audit_entries(cli_records)
    service_uid = pwd.getpwnam("luksctl_api").pw_uid
    assert [pick(entry, "action", "client", "outcome", "status") for entry in cli] == [
        ("open", f"uid {service_uid}", "ok", 0),  # the API's `sudo luksctl --json open`
        ("close", "uid 0", "ok", 0),
    ], cli
