"""The audit trail: one JSON line per state-changing or refused request.

The services write it to stdout, which systemd hands to journald; the CLI
writes it to syslog. Lines carry
who, what, the outcome and the Vault path, never a secret: callers pass
only the fields named here.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys

logger = logging.getLogger("luksctl.audit")
logger.setLevel(logging.INFO)
logger.propagate = False  # audit lines go only to their own sink, never into the app's log
SYSLOG_SOCKET = "/dev/log"


def _send_to(handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("%(message)s"))
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)


def use_stdout() -> None:
    """For the services: systemd hands their stdout to journald."""
    _send_to(logging.StreamHandler(sys.stdout))


def use_syslog() -> None:
    """For the CLI, which has no service stdout: the journal via /dev/log, else stderr."""
    if os.path.exists(SYSLOG_SOCKET):
        handler: logging.Handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
        handler.ident = "luksctl: "
    else:
        handler = logging.StreamHandler(sys.stderr)
    _send_to(handler)


def record(
    *,
    action: str,
    client: str | None,
    outcome: str,
    status: int,
    duration_ms: float,
    error_class: str | None = None,
    volume: str | None = None,
    vault_path: str | None = None,
    nodes: dict[str, str] | None = None,
    fanout: str | None = None,
    alert: str | None = None,
) -> None:
    entry = {
        "audit": "luksctl",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "client": client,
        "action": action,
        "outcome": outcome,
        "status": status,
        "error_class": error_class,
        "duration_ms": round(duration_ms, 1),
        "volume": volume,
        "vault_path": vault_path,
        "nodes": nodes,
        "fanout": fanout,
        "alert": alert,
    }
    logger.info(json.dumps({key: value for key, value in entry.items() if value is not None}, sort_keys=False))
