"""gunicorn answers malformed HTTP (bad request line, oversized headers...) itself,
before the app sees the request. This makes those answers JSON with the state
too, as the dashboard parses every body (PROTOCOL §3)."""

from __future__ import annotations

import json

from flask import Flask
from gunicorn import util


def answer_malformed_requests_in_json(app: Flask) -> None:
    """Called from gunicorn's post_worker_init hook, once per worker process.

    Leaves gunicorn as it is for an app that is not ours (make bench serves one).
    """
    current_state = getattr(app, "extensions", {}).get("luksctl_state_body")
    if current_state is None:
        return

    def write_error(sock, status_int: int, reason: str, mesg: str) -> None:
        # `mesg` echoes the client's bytes back; gunicorn's log has it, the answer does not.
        body = json.dumps({**current_state(), "error": f"malformed HTTP request: {reason}"}).encode()
        head = (
            f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        util.write_nonblock(sock, head.encode("latin-1") + body)

    util.write_error = write_error
