"""report's "last open" and "last key change": read from the journal at the runner seam, by a fake journalctl that
applies the FIELD=VALUE matches it is given, as journald does (all of them must hold)."""

from __future__ import annotations

import json

from luksctl import runner
from luksctl.root import report

ROOT_OPEN = {"SYSLOG_IDENTIFIER": "luksctl", "_UID": "0", "MESSAGE": json.dumps({"action": "open", "outcome": "ok", "time": "2026-12-01T10:00:00Z"})}
# `logger -t luksctl '{...}'` by a local user: the identifier is the sender's to choose, _UID is journald's.
FORGED_OPEN = {"SYSLOG_IDENTIFIER": "luksctl", "_UID": "1000", "MESSAGE": json.dumps({"action": "open", "outcome": "ok", "time": "2026-12-05T04:00:00Z"})}
ROOT_ROTATE = {"SYSLOG_IDENTIFIER": "luksctl", "_UID": "0", "MESSAGE": json.dumps({"action": "rotate", "outcome": "ok", "time": "2026-12-02T10:00:00Z"})}
FAILED_ROTATE = {"SYSLOG_IDENTIFIER": "luksctl", "_UID": "0", "MESSAGE": json.dumps({"action": "rotate", "outcome": "error", "time": "2026-12-03T10:00:00Z"})}
FORGED_KEY_CHANGE = {"SYSLOG_IDENTIFIER": "luksctl", "_UID": "1000", "MESSAGE": json.dumps({"action": "recovery-key add", "outcome": "ok", "time": "2026-12-04T10:00:00Z"})}


def journal(monkeypatch, entries: list[dict]) -> list[list[str]]:
    """Serve `entries` (newest last) to journalctl --output=cat --reverse; the argv of each call."""
    calls = []

    def journalctl(argv, *, timeout, check=True, stdin=None):
        calls.append(argv)
        matches = [arg.split("=", 1) for arg in argv[1:] if not arg.startswith("-")]
        found = [entry["MESSAGE"] for entry in reversed(entries) if all(entry.get(key) == value for key, value in matches)]
        return runner.Result(argv, 0, "".join(line + "\n" for line in found), "")

    monkeypatch.setattr(runner, "run", journalctl)
    return calls


def test_last_open_is_the_newest_open_root_logged(monkeypatch):
    calls = journal(monkeypatch, [ROOT_OPEN, FORGED_OPEN])

    assert report.last_successes() == ("2026-12-01T10:00:00Z", None)
    assert calls == [["journalctl", "--no-pager", "--output=cat", "--reverse", f"--lines={report.JOURNAL_LINES}",
                      "SYSLOG_IDENTIFIER=luksctl", "_UID=0"]]


def test_last_open_is_unknown_when_only_another_user_logged_one(monkeypatch):
    journal(monkeypatch, [FORGED_OPEN])

    assert report.last_successes() == (None, None)


def test_last_key_change_is_the_newest_successful_one_root_logged(monkeypatch):
    journal(monkeypatch, [ROOT_OPEN, ROOT_ROTATE, FAILED_ROTATE, FORGED_KEY_CHANGE])

    assert report.last_successes() == ("2026-12-01T10:00:00Z", "2026-12-02T10:00:00Z")
