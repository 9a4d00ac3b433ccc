"""gunicorn answers malformed HTTP (bad request line, oversized headers...) itself,
before the app sees the request. This makes those answers JSON with the state
too, as the dashboard parses every body (PROTOCOL §3)."""

from __future__ import annotations

import json
from collections.abc import Callable

from flask import Flask
from gunicorn import util


def state_body_of(app: Flask) -> Callable[[], dict] | None:
    """The app's `current_state()` (errors.register_json_errors); None for an app not ours."""
    return getattr(app, "extensions", {}).get("luksctl_state_body")


def json_answer(current_state: Callable[[], dict], status: int, reason: str, error: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for writing to a raw socket."""
    body = json.dumps({**current_state(), "error": error}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def answer_malformed_requests_in_json(app: Flask) -> None:
    """Called from gunicorn's post_worker_init hook, once per worker process.

    Leaves gunicorn as it is for an app that is not ours (make bench serves one).
    """
    current_state = state_body_of(app)
    if current_state is None:
        return

    def write_error(sock, status_int: int, reason: str, mesg: str) -> None:
        # `mesg` echoes the client's bytes back; gunicorn's log has it, the answer does not.
        util.write_nonblock(sock, json_answer(current_state, status_int, reason, f"malformed HTTP request: {reason}"))

    util.write_error = write_error
