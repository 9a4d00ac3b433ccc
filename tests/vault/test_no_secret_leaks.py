"""The open path never shows the passphrase or a token: not in logs, exceptions or answers.

Each case runs POST /open end to end (app + real OpenBao + fake bridge) and
collects everything a person could get to see:
- every log record at DEBUG from every logger (werkzeug, flask, ours,
  also the audit logger that does not propagate), with its extra fields;
- every exception raised anywhere during the request (a trace hook sees them
  all, caught or not): str, repr and formatted traceback;
- the response body and every header; and whatever reached stdout/stderr.
"""

from __future__ import annotations

import logging
import sys
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from support.waiting import wait_until

from luksctl.errors import WrongPassphrase

from .conftest import OPEN_URL, open_body

CASES = {
    # case: (expected status, bridge receives the passphrase)
    "success": (200, True),
    "used wrapping token": (403, False),
    "expired wrapping token": (403, False),
    "missing secret": (404, False),
    "missing key": (404, False),
    "vault down": (502, False),
    "untrusted vault certificate": (502, False),
    "bridge refuses the passphrase": (422, True),
    "bridge crashes": (500, True),
}


@dataclass
class Seen:
    texts: list[str] = field(default_factory=list)
    exceptions: list[BaseException] = field(default_factory=list)


@pytest.fixture
def all_logs(caplog) -> Iterator[None]:
    """DEBUG from every logger into caplog, non-propagating ones included."""
    caplog.set_level(logging.DEBUG)
    for name in ("werkzeug", "flask", "luksctl"):
        caplog.set_level(logging.DEBUG, logger=name)
    loggers = [logging.getLogger("luksctl.audit")] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger) and not logger.propagate
    ]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)


def post_and_watch(app, body: dict) -> tuple[object, list[BaseException]]:
    """POST /open with a trace hook that records every exception raised during the request."""
    raised: dict[int, BaseException] = {}

    def tracer(frame, event, arg):
        if event == "exception":
            raised.setdefault(id(arg[1]), arg[1])
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        response = app.test_client().post(OPEN_URL, json=body)
    finally:
        sys.settrace(previous)
    return response, list(raised.values())


def secret_parts(token: str) -> str:
    """A token without its type prefix (s., hvs., ...): a leak of the rest is a leak too."""
    return token.split(".", 1)[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_open_leaks_neither_passphrase_nor_tokens(case, bao, frontend_app, fake_bridge, caplog, capsys, all_logs, closed_port_url, self_signed_server):
    expected_status, bridge_gets_it = CASES[case]
    passphrase = f"Leak-Canary-{uuid.uuid4().hex}"
    client_token = f"clienttok{uuid.uuid4().hex}"  # the id of the token inside the wrapping token
    wrapped = bao.wrap_token(token_id=client_token)
    path = bao.store_secret(passphrase)
    body = open_body(bao.url, wrapped.token, path)

    if case == "used wrapping token":
        assert bao.unwrap(wrapped.token)["auth"]["client_token"] == client_token
    elif case == "expired wrapping token":
        wrapped = bao.wrap_token("1s", token_id=f"clienttok{uuid.uuid4().hex}")
        client_token = wrapped.client_token
        body["vault_token"] = wrapped.token
        wait_until(lambda: not bao.lookup_wrapping(wrapped.token), 15, "the 1 s wrapping token to expire", interval=0.05)
    elif case == "missing secret":
        body["secret_path"] = f"{path}-missing"
    elif case == "missing key":
        body["secret_key"] = "not_the_key"  # the secret (with the passphrase) is read, the key is absent
    elif case == "vault down":
        body["vault_url"] = closed_port_url
    elif case == "untrusted vault certificate":
        body["vault_url"] = self_signed_server.url
    elif case == "bridge refuses the passphrase":
        fake_bridge.error = WrongPassphrase("the passphrase does not open the volume")
    elif case == "bridge crashes":
        fake_bridge.error = RuntimeError("cryptsetup went away")

    caplog.clear()
    capsys.readouterr()
    response, raised = post_and_watch(frontend_app, body)

    # The case did what it says, so the search below looks at a real run.
    assert response.status_code == expected_status, response.get_data(as_text=True)
    assert response.get_json()["volume_state"] in ("mounted", "unmounted")
    assert fake_bridge.passphrases == ([passphrase] if bridge_gets_it else [])
    assert any(record.name == "luksctl.vault" and record.levelno == logging.DEBUG for record in caplog.records), "DEBUG logging was not captured"
    assert any(record.name == "luksctl.audit" for record in caplog.records), "the audit line was not captured"
    if expected_status != 200:
        assert raised, "the trace hook saw no exception"

    out, err = capsys.readouterr()
    seen = [response.get_data(as_text=True), str(response.headers), out, err, caplog.text]
    seen += [f"{record.getMessage()} {record.__dict__!r}" for record in caplog.records]
    seen += [f"{exc!s} {exc!r} {''.join(traceback.format_exception(exc))}" for exc in raised]
    needles = {"passphrase": passphrase, "wrapping token": secret_parts(wrapped.token), "unwrapped token": client_token}
    leaks = [f"{name} in: {text[:300]!r}" for name, needle in needles.items() for text in seen if needle in text]
    assert not leaks, "\n".join(leaks)
