"""The audit trail: one JSON line per open and per refused request, in the format the README documents."""

from __future__ import annotations

import pytest

from frontend_fakes import OPEN, STATUS, payload
from luksctl.errors import WrappingTokenInvalid


def test_a_successful_open_leaves_one_line_with_volume_and_vault_path(client, audit_lines):
    client.post(OPEN, json=payload())

    [line] = audit_lines()
    assert line["action"] == "open" and line["outcome"] == "ok" and line["status"] == 200
    assert line["client"] == "127.0.0.1"
    assert line["volume"] == "xkqzbmwe"
    assert line["vault_path"].startswith("secrets/user-sub@idp/3f1c0f7e-deployment/storage_encryption")
    assert line["duration_ms"] >= 0
    assert "error_class" not in line


def test_status_polls_leave_no_line(client, audit_lines):
    client.get(STATUS)

    assert audit_lines() == []


def test_a_refused_request_names_its_error_class(client, audit_lines):
    client.post(OPEN, json=payload(secret_path="../etc"))

    [line] = audit_lines()
    assert (line["action"], line["outcome"], line["status"], line["error_class"]) == ("open", "denied", 400, "BadRequest")


def test_an_already_used_wrapping_token_is_flagged_as_possible_interception(client, fake_vault, audit_lines):
    fake_vault.error = WrappingTokenInvalid("expired or already used", possible_interception=True)

    client.post(OPEN, json=payload())

    [line] = audit_lines()
    assert line["status"] == 403 and line["error_class"] == "WrappingTokenInvalid"
    assert "interception" in line["alert"]


def test_an_unknown_route_is_audited_as_unknown(client, audit_lines):
    client.post("/luksctl_api/v1.0/format")

    [line] = audit_lines()
    assert (line["action"], line["status"]) == ("unknown", 404)
