"""/metrics on both services: prometheus_client's text exposition, across gunicorn's workers.

With PROMETHEUS_MULTIPROC_DIR set (the units set it; gunicorn.conf.py empties it at start and
drops a dead worker's live values), every worker process keeps its samples in files there and
a scrape adds them up (prometheus_client's multiprocess mode): whichever worker answers speaks
for all. The volume and NFS state are read when scraped, as /status reads them.

Labels are fixed words (outcomes, error classes, stages, Vault steps, states) and the workers'
addresses from config WN_IPS: never a token, a secret, a Vault path or a caller.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from ..status import VolumeState

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Each gunicorn worker imports this as the service user, and the metrics below write there
    # from their creation on; systemd made only its parent (RuntimeDirectory=).
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], mode=0o700, exist_ok=True)

COUNTED = CollectorRegistry()  # this process's own samples: what a scrape reads without multiprocess mode

OPENS = Counter("luksctl_api_opens", "Open requests by outcome (ok; denied: a 4xx; error: a 5xx) and error class (none when ok).",
                ["outcome", "error_class"], registry=COUNTED)
OPEN_STAGE_SECONDS = Histogram(
    "luksctl_api_open_stage_duration_seconds",
    "Time an open spent in each stage: vault (lookup, unwrap, read, revoke) and privileged (sudo luksctl open: cryptsetup, mount, actions).",
    ["stage"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 240), registry=COUNTED)
LAST_OPEN = Gauge("luksctl_api_last_open_success_timestamp_seconds", "When this service last opened and mounted the volume (Unix time).",
                  multiprocess_mode="max", registry=COUNTED)
VAULT_SECONDS = Histogram("luksctl_api_vault_request_duration_seconds", "Latency of each Vault request, by step (wrapping lookup, unwrap, ...).",
                          ["step"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=COUNTED)
RATE_LIMITED = Counter("luksctl_api_rate_limited", "Opens refused (429) because their address had too many failed opens.", registry=COUNTED)
FANOUT = Counter("luksctl_api_fanout_outcomes", "Answers of each worker (WN_IPS) to the front end's fan-outs, by call (nfs-mount, status).",
                 ["call", "worker", "outcome"], registry=COUNTED)

STATE_HELP = {
    "luksctl_api_volume_state": "1 for the volume's state now (mounted, unmounted, unavailable), 0 for the others.",
    "luksctl_api_nfs_state": "1 for the worker's NFS state now (mounted, unmounted, unavailable), 0 for the others.",
}


class StateNow:
    """A gauge read at scrape time: 1 for the current state, 0 for the others."""

    def __init__(self, name: str, read_state: Callable[[], str]) -> None:
        self.name = name
        self.read_state = read_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        current = self.read_state()
        family = GaugeMetricFamily(self.name, STATE_HELP[self.name], labels=["state"])
        for state in VolumeState:
            family.add_metric([state.value], 1 if current == state.value else 0)
        yield family


def counted_registry() -> CollectorRegistry:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return COUNTED
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return registry


@contextmanager
def timed_stage(stage: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        OPEN_STAGE_SECONDS.labels(stage).observe(time.monotonic() - started)


def observe_vault_request(step: str, seconds: float) -> None:
    VAULT_SECONDS.labels(step).observe(seconds)


def count_fanout(call: str, answers: dict[str, str]) -> None:
    for worker, outcome in answers.items():
        FANOUT.labels(call, worker, outcome).inc()


def install_metrics(app: Flask, state_metric: str, read_state: Callable[[], str], open_endpoint: str | None = None) -> None:
    """GET /metrics (behind the app's client allowlist, as every route); with `open_endpoint`, count its answers."""
    live = CollectorRegistry()
    live.register(StateNow(state_metric, read_state))
    bp = Blueprint("metrics", __name__)

    @bp.get("/metrics")
    def metrics():
        return Response(generate_latest(counted_registry()) + generate_latest(live), content_type=CONTENT_TYPE_LATEST)

    app.register_blueprint(bp)
    if open_endpoint is None:
        return

    @app.after_request
    def count_open(response):
        if request.endpoint == open_endpoint:
            status = response.status_code
            error_class = g.get("error_class") or "none"
            OPENS.labels("ok" if status < 400 else "denied" if status < 500 else "error", error_class).inc()
            if error_class == "TooManyFailures":
                RATE_LIMITED.inc()
        return response
