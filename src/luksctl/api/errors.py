"""One JSON error handler per app: every failure answers JSON with the state key.

The dashboard reads `json.loads(r.text)["volume_state"]` from every answer,
so even a 404 or a crash must carry the state, plus an `error` a person can act on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import CommandFailed, LuksctlError

log = logging.getLogger(__name__)


INTERNAL = "internal error; the service log has the details"
OPENAPI_DIR = Path(__file__).with_name("openapi")


def openapi_document(name: str) -> dict:
    """The published contract of one service, kept in the repo and served as it is."""
    return json.loads((OPENAPI_DIR / f"{name}.json").read_text())


def register_json_errors(app: Flask, current_state: Callable[[], dict]) -> None:
    """`current_state()` gives e.g. {"volume_state": "unmounted"}; it must never raise."""

    def answer(exc: Exception, status: int, message: str, headers: dict | None = None):
        g.error_class = exc.__class__.__name__  # for the audit line
        response = jsonify({**current_state(), "error": message})
        response.status_code = status
        response.headers.update(headers or {})
        return response

    @app.errorhandler(LuksctlError)
    def domain_error(exc: LuksctlError):
        log.warning("%s: %s", exc.__class__.__name__, exc.detail() if isinstance(exc, CommandFailed) else exc.message)
        # A failed command's message may name internals; the log has them, the client gets a pointer.
        message = INTERNAL if isinstance(exc, CommandFailed) else exc.message
        return answer(exc, exc.http_status, message, getattr(exc, "headers", None))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kept = {name: value for name, value in exc.get_headers() if name in ("Allow", "Retry-After")}
        return answer(exc, exc.code or 500, exc.description or exc.name, kept)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unexpected error")
        return answer(exc, 500, INTERNAL)
