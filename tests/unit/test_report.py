"""report's "last open": read from the journal at the runner seam, by a fake journalctl that
applies the FIELD=VALUE matches it is given, as journald does (all of them must hold)."""

from __future__ import annotations

import json

from luksctl import runner
from luksctl.root import report

ROOT_OPEN = {"SYSLOG_IDENTIFIER": "luksctl", "_UID": "0", "MESSAGE": json.dumps({"action": "open", "outcome": "ok", "time": "2026-12-01T10:00:00Z"})}
# `logger -t luksctl '{...}'` by a local user: the identifier is the sender's to choose, _UID is journald's.
FORGED_OPEN = {"SYSLOG_IDENTIFIER": "luksctl", "_UID": "1000", "MESSAGE": json.dumps({"action": "open", "outcome": "ok", "time": "2026-12-05T04:00:00Z"})}


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

    assert report.last_open() == "2026-12-01T10:00:00Z"
    assert calls == [["journalctl", "--no-pager", "--output=cat", "--reverse", f"--lines={report.JOURNAL_LINES}",
                      "SYSLOG_IDENTIFIER=luksctl", "_UID=0"]]


def test_last_open_is_unknown_when_only_another_user_logged_one(monkeypatch):
    journal(monkeypatch, [FORGED_OPEN])

    assert report.last_open() is None
