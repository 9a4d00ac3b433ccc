"""Request hooks that write the audit trail for both services."""

from __future__ import annotations

import time

from flask import Flask, g, request

from .. import audit


def note(**fields) -> None:
    """Add fields (volume, vault_path, nodes, ...) to this request's audit line."""
    g.setdefault("audit", {}).update(fields)


def install_audit(app: Flask, actions: dict[str, str]) -> None:
    """`actions` maps a Flask endpoint to its audit action name."""
    audit.use_stdout()

    @app.before_request
    def start_clock():
        g.started = time.monotonic()

    @app.after_request
    def write_audit_line(response):
        status = response.status_code
        if request.method == "GET" and status < 400 and "nodes" not in g.get("audit", {}):
            return response  # status polls are constant; only refusals and fan-outs are worth a line
        audit.record(
            action=actions.get(request.endpoint or "", "unknown"),
            client=request.remote_addr,
            outcome="ok" if status < 400 else "denied" if status < 500 else "error",
            status=status,
            duration_ms=(time.monotonic() - g.get("started", time.monotonic())) * 1000,
            error_class=g.get("error_class"),
            **g.get("audit", {}),
        )
        return response
