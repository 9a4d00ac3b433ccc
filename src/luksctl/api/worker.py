"""Worker node API: /luksctl_api_wn/v1.0/status and /nfs-mount (PROTOCOL §5)."""

from __future__ import annotations

import hmac
from pathlib import Path

from flask import Blueprint, Flask, current_app, request

from ..config import WorkerConfig, load_api_config
from ..errors import CallerRefused, NfsMountIncomplete
from ..status import VolumeState, nfs_mount_states
from .auditing import install_audit, note
from .cluster import TOKEN_HEADER, read_token
from .coalesce import CoalescedCall
from .errors import openapi_document, register_json_errors
from .guards import install_client_allowlist
from .metrics import install_metrics
from .privileged import PrivilegedBridge, SudoBridge

PREFIX = "/luksctl_api_wn/v1.0"
RUNTIME_DIR = Path("/run/luksctl-api-wn")  # the unit's RuntimeDirectory=


class Worker:
    def __init__(self, config: WorkerConfig, bridge: PrivilegedBridge, runtime_dir: Path = RUNTIME_DIR):
        self.config = config
        self.bridge = bridge
        # One `mount -a` at a time across threads and gunicorn workers; requests that arrive
        # while it runs share it instead of starting their own.
        self.remounts = CoalescedCall(runtime_dir, "nfs-mount", min_interval=0, wait=config.PRIVILEGED_TIMEOUT + 30)
        self.token = None if config.ALLOW_UNAUTHENTICATED_NFS_MOUNT else read_token(Path(config.CLUSTER_TOKEN_FILE), missing_ok=True)

    def check_caller(self, presented: str | None) -> None:
        """Only the front end, which holds the shared cluster token, may trigger a remount."""
        if self.config.ALLOW_UNAUTHENTICATED_NFS_MOUNT:
            return
        if self.token is None:
            raise CallerRefused(f"no cluster token at {self.config.CLUSTER_TOKEN_FILE}: copy it from the front end, then restart this service")
        if not presented or not hmac.compare_digest(presented.encode(), self.token.encode()):
            raise CallerRefused(f"missing or wrong {TOKEN_HEADER} header: only the front end may ask for nfs-mount")

    def mountpoints(self) -> dict[str, bool]:
        return nfs_mount_states(self.config.NFS_MOUNTPOINT_LIST)

    def body(self) -> dict:
        mountpoints = self.mountpoints()
        state = VolumeState.MOUNTED if all(mountpoints.values()) else VolumeState.UNMOUNTED
        return {"nfs_state": state.value, "mountpoints": mountpoints}

    def state_body(self) -> dict:
        try:
            return {"nfs_state": self.body()["nfs_state"]}
        except OSError:
            return {"nfs_state": VolumeState.UNAVAILABLE.value}

    def nfs_mount(self) -> dict:
        if all(self.mountpoints().values()):
            return self.body()
        self.remounts.run(self.bridge.nfs_mount)
        body = self.body()
        missing = [mountpoint for mountpoint, mounted in body["mountpoints"].items() if not mounted]
        if missing:
            raise NfsMountIncomplete(f"these NFS mountpoints are still not mounted: {', '.join(missing)}; check /etc/fstab and the NFS server")
        return body


bp = Blueprint("worker", __name__, url_prefix=PREFIX)


def _worker() -> Worker:
    return current_app.extensions["luksctl_worker"]


@bp.get("/openapi.json")
def openapi():
    return openapi_document("worker")


@bp.get("/status")
def status():
    body = _worker().state_body()
    if body["nfs_state"] == VolumeState.UNAVAILABLE.value:
        body["error"] = "the mount table cannot be read"
    return body


@bp.post("/nfs-mount")
def nfs_mount():
    worker = _worker()
    note(volume=",".join(worker.config.NFS_MOUNTPOINT_LIST))
    worker.check_caller(request.headers.get(TOKEN_HEADER))
    return worker.nfs_mount()


def create_worker_app(
    config: WorkerConfig | None = None, bridge: PrivilegedBridge | None = None, runtime_dir: Path = RUNTIME_DIR
) -> Flask:
    if config is None:
        config = load_api_config(WorkerConfig)
    worker = Worker(config, bridge or SudoBridge(config.LUKSCTL_BINARY, config.PRIVILEGED_TIMEOUT), runtime_dir)
    app = Flask(__name__)
    app.extensions["luksctl_worker"] = worker
    register_json_errors(app, worker.state_body)
    install_audit(app, {"worker.nfs_mount": "nfs-mount", "worker.status": "status", "metrics.metrics": "metrics"})
    install_client_allowlist(app, config.ALLOWED_CLIENTS)
    app.register_blueprint(bp)
    if config.METRICS:
        install_metrics(app, "luksctl_api_nfs_state", lambda: worker.state_body()["nfs_state"])
    return app
