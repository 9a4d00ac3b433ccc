"""`luksctl report --prometheus` on real LUKS headers in image files (tests/luks_lab.py): the file
the node exporter's textfile collector reads, checked by Debian's promtool."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from luks_lab import LUKS_LAB_FAST_NEW_SLOT as FAST_NEW_SLOT
from luks_lab import LUKS_LAB_PASSPHRASE as PASSPHRASE

from luksctl import runner
from luksctl.errors import EXIT_CONFIG, EXIT_OK
from luksctl.root import journal, pending, textfile

TOKEN = "hvs.CAESIPlantedWrappingTokenXyZ"
VAULT_PATH = "secret/data/planted-vault-path/volume"
USER = "planted-user-4242"


def audit_journal(monkeypatch, entries: list[dict]) -> None:
    """root's audit lines (newest first, as journalctl --reverse gives them); other commands run for real."""
    real_run = runner.run

    def run(argv, *, timeout, check=True, stdin=None):
        if argv[0] != "journalctl":
            return real_run(argv, timeout=timeout, check=check, stdin=stdin)
        return runner.Result(argv, 0, "".join(json.dumps(entry) + "\n" for entry in entries), "")

    monkeypatch.setattr(runner, "run", run)


def prometheus_report(lab, capsys, directory) -> str:
    code, answer = lab.run(capsys, "report", "--prometheus", "--textfile-dir", str(directory))
    assert code == EXIT_OK, answer
    assert answer["textfile"] == str(directory / "luksctl.prom")
    return (directory / "luksctl.prom").read_text()


def promtool_check(text: str) -> None:
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked.stdout + checked.stderr


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


@pytest.fixture
def collector(tmp_path):
    directory = tmp_path / "node-exporter"
    directory.mkdir()
    return directory


def test_report_writes_a_textfile_promtool_accepts(lab, capsys, collector):
    lab.run(capsys, "header", "backup")

    text = prometheus_report(lab, capsys, collector)

    promtool_check(text)
    assert stat.S_IMODE((collector / "luksctl.prom").stat().st_mode) == 0o644, "the node exporter runs as its own user"
    found = samples(text)
    assert found['luksctl_volume_state{state="unmounted"}'] == 1 and found['luksctl_volume_state{state="mounted"}'] == 0
    assert found["luksctl_device_present"] == 1 and found["luksctl_mapper_open"] == 0
    assert found["luksctl_keyslots_in_use"] == 1
    assert found['luksctl_keyslot_info{slot="0",pbkdf="pbkdf2",recovery_key="false"}'] == 1
    assert found['luksctl_keyslot_pbkdf_iterations{slot="0"}'] == 1000
    assert found["luksctl_header_backup_present"] == 1 and found["luksctl_header_backup_matches"] == 1
    assert found["luksctl_header_backup_older_than_key_change"] == 0
    assert 0 <= found["luksctl_header_backup_age_seconds"] < 60
    assert found['luksctl_pending{operation="setup"}'] == 0 and found['luksctl_pending{operation="rotate"}'] == 0
    assert [name for name in found if name.startswith("luksctl_pending_since")] == []


def test_a_key_added_after_the_backup_makes_it_older_than_the_last_key_change(lab, capsys, collector):
    lab.run(capsys, "header", "backup")
    subprocess.run(["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(PASSPHRASE)}", *FAST_NEW_SLOT, str(lab.image)],
                   input=PASSPHRASE + b"added since the backup", check=True, capture_output=True)

    found = samples(prometheus_report(lab, capsys, collector))

    assert found["luksctl_keyslots_in_use"] == 2
    assert found["luksctl_header_backup_older_than_key_change"] == 1 and found["luksctl_header_backup_matches"] == 0


def test_a_missing_backup_and_a_detached_device_leave_unknowns_out(lab, capsys, collector):
    lab.image.unlink()

    text = prometheus_report(lab, capsys, collector)

    promtool_check(text)
    found = samples(text)
    assert found["luksctl_device_present"] == 0 and found["luksctl_header_backup_present"] == 0
    assert not [name for name in found if name.startswith(("luksctl_keyslot", "luksctl_header_backup_older"))], "unknown is not zero"


def test_last_open_and_last_key_change_come_from_roots_audit_lines(lab, capsys, collector, monkeypatch):
    audit_journal(monkeypatch, [
        {"action": "open", "outcome": "error", "time": "2026-12-04T09:00:00.000+00:00"},
        {"action": "rotate", "outcome": "ok", "time": "2026-12-03T08:00:00.000+00:00"},
        {"action": "open", "outcome": "ok", "time": "2026-12-02T07:00:00.000+00:00"},
        {"action": "recovery-key add", "outcome": "ok", "time": "2026-12-01T06:00:00.000+00:00"},
    ])

    found = samples(prometheus_report(lab, capsys, collector))

    assert found["luksctl_last_open_timestamp_seconds"] == 1796194800  # 2026-12-02T07:00:00Z
    assert found["luksctl_last_key_change_timestamp_seconds"] == 1796284800  # 2026-12-03T08:00:00Z


def test_an_unfinished_setup_and_rotation_are_pending_with_their_start_and_setups_last_step(lab, capsys, collector):
    record = journal.Journal(lab.dir)  # the state directory is the ini's (/etc/luks)
    record.begin(PASSPHRASE, {"device": str(lab.image)})
    record.record(journal.VAULT_WRITTEN)
    record.record(journal.FORMATTED)
    pending.PendingStore(lab.dir, "rotate").write(pending.ROTATION, b'{"passphrase": "x"}')

    text = prometheus_report(lab, capsys, collector)

    promtool_check(text)
    found = samples(text)
    assert found['luksctl_pending{operation="setup"}'] == 1 and found['luksctl_pending{operation="rotate"}'] == 1
    since = (lab.dir / pending.SETUP_PASSPHRASE).stat().st_mtime
    assert found['luksctl_pending_since_timestamp_seconds{operation="setup"}'] == pytest.approx(since)
    assert found['luksctl_setup_last_step_info{step="formatted"}'] == 1


def test_no_label_or_value_carries_a_secret_a_token_a_vault_path_a_user_or_a_path(lab, capsys, collector, monkeypatch):
    audit_journal(monkeypatch, [{"action": "open", "outcome": "ok", "time": "2026-12-02T07:00:00.000+00:00", "client": USER,
                                 "vault_path": VAULT_PATH, "token": TOKEN, "passphrase": PASSPHRASE.decode()}])
    record = journal.Journal(lab.dir)
    record.begin(PASSPHRASE, {"device": str(lab.image), "vault_path": VAULT_PATH, "user": USER, "token": TOKEN})
    record.record(journal.VAULT_WRITTEN, secret=VAULT_PATH)
    pending.PendingStore(lab.dir, "rotate").write(pending.ROTATION, json.dumps({"passphrase": "rotated " + TOKEN}).encode())
    lab.run(capsys, "header", "backup")

    text = prometheus_report(lab, capsys, collector)

    for planted in (PASSPHRASE.decode(), TOKEN, VAULT_PATH, "planted", USER, str(lab.dir), str(lab.image), lab.uuid, "labvol"):
        assert planted not in text, planted


def test_a_missing_textfile_directory_is_a_config_error_that_names_it(lab, capsys, tmp_path):
    code, answer = lab.run(capsys, "report", "--prometheus", "--textfile-dir", str(tmp_path / "absent"))

    assert code == EXIT_CONFIG and f"{tmp_path / 'absent'} is not a directory" in answer["error"]


def test_a_killed_writes_temporary_is_removed_by_the_next(lab, capsys, collector):
    leftover = collector / ".luksctl.prom.0123abcd.tmp"
    leftover.write_text("half")

    prometheus_report(lab, capsys, collector)

    assert sorted(path.name for path in collector.iterdir()) == ["luksctl.prom"]


def test_the_report_units_pass_systemd_analyze_and_run_the_report_every_5_minutes_and_at_boot(tmp_path):
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    service = (deploy / "luksctl-report.service").read_text()
    timer = (deploy / "luksctl-report.timer").read_text()
    assert "\nExecStart=/usr/local/sbin/luksctl report --prometheus\n" in service and "\nType=oneshot\n" in service
    assert "\nOnBootSec=1min\n" in timer and "\nOnUnitActiveSec=5min\n" in timer
    # verify wants ExecStart's binary to exist: the host has no /usr/local/sbin/luksctl
    (tmp_path / "luksctl-report.service").write_text(service.replace("/usr/local/sbin/luksctl", "/bin/true"))
    (tmp_path / "luksctl-report.timer").write_text(timer)

    verified = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "luksctl-report.service"), str(tmp_path / "luksctl-report.timer")],
                              capture_output=True, text=True)

    assert verified.returncode == 0 and not verified.stderr, verified.stderr
