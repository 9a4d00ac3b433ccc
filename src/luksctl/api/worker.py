"""Worker node API: /luksctl_api_wn/v1.0/status and /nfs-mount (PROTOCOL §5)."""

from __future__ import annotations

from flask import Blueprint, Flask, current_app

from ..errors import NfsMountIncomplete
from ..config import WorkerConfig, load_api_config
from ..privileged import PrivilegedBridge, SudoBridge
from ..status import VolumeState, nfs_mount_states
from .errors import register_json_errors

PREFIX = "/luksctl_api_wn/v1.0"


class Worker:
    def __init__(self, config: WorkerConfig, bridge: PrivilegedBridge):
        self.config = config
        self.bridge = bridge

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
        self.bridge.nfs_mount()
        body = self.body()
        missing = [mountpoint for mountpoint, mounted in body["mountpoints"].items() if not mounted]
        if missing:
            raise NfsMountIncomplete(f"these NFS mountpoints are still not mounted: {', '.join(missing)}; check /etc/fstab and the NFS server")
        return body


bp = Blueprint("worker", __name__, url_prefix=PREFIX)


def _worker() -> Worker:
    return current_app.extensions["luksctl_worker"]


@bp.get("/status")
def status():
    return {"nfs_state": _worker().body()["nfs_state"]}


@bp.post("/nfs-mount")
def nfs_mount():
    return _worker().nfs_mount()


def create_worker_app(config: WorkerConfig | None = None, bridge: PrivilegedBridge | None = None) -> Flask:
    if config is None:
        config = load_api_config(WorkerConfig)
    worker = Worker(config, bridge or SudoBridge(config.LUKSCTL_BINARY, config.PRIVILEGED_TIMEOUT))
    app = Flask(__name__)
    app.extensions["luksctl_worker"] = worker
    register_json_errors(app, worker.state_body)
    app.register_blueprint(bp)
    return app
