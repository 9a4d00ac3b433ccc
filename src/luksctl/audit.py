"""The audit trail: one JSON line per state-changing or refused request, on stdout.

systemd hands the service's stdout to journald, which keeps it. Lines carry
who, what, the outcome and the Vault path, never a secret: callers pass
only the fields named here.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

logger = logging.getLogger("luksctl.audit")


def _configure() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
) -> None:
    _configure()
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
    }
    logger.info(json.dumps({key: value for key, value in entry.items() if value is not None}, sort_keys=False))
