"""Post-open actions (docker, NFS server) and the worker's NFS remount (root only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .. import runner
from ..config import FrontendConfig
from ..errors import CommandFailed

log = logging.getLogger(__name__)

OS_RELEASE = Path("/etc/os-release")
SERVICE_TIMEOUT = 120
NFS_MOUNT_TIMEOUT = 90
RHEL_FAMILY = {"rhel", "centos", "fedora", "rocky", "almalinux", "ol", "amzn"}


@dataclass(frozen=True)
class ActionResult:
    name: str
    ok: bool
    error: str | None = None


def nfs_server_service(config: FrontendConfig, os_release: Path = OS_RELEASE) -> str:
    """nfs-server on RHEL-family systems, nfs-kernel-server on Debian/Ubuntu; NFS_SERVICE overrides."""
    if config.NFS_SERVICE:
        return config.NFS_SERVICE
    ids: set[str] = set()
    try:
        for line in os_release.read_text().splitlines():
            key, _, value = line.partition("=")
            if key in ("ID", "ID_LIKE"):
                ids.update(value.strip().strip("\"'").split())
    except OSError:
        pass
    return "nfs-server" if ids & RHEL_FAMILY else "nfs-kernel-server"


def planned_actions(config: FrontendConfig, os_release: Path = OS_RELEASE) -> list[str]:
    """Services to restart once the volume is mounted, in order."""
    services = []
    if config.restarts_docker:
        services.append("docker")
    if config.is_cluster:
        services.append(nfs_server_service(config, os_release))
    return services


def restart_service(name: str) -> None:
    runner.run(["systemctl", "restart", name], timeout=SERVICE_TIMEOUT)


def run_post_open_actions(config: FrontendConfig, os_release: Path = OS_RELEASE) -> list[ActionResult]:
    """Restart every planned service; one failure does not skip the others."""
    results = []
    for service in planned_actions(config, os_release):
        try:
            restart_service(service)
            results.append(ActionResult(f"restart {service}", ok=True))
        except CommandFailed as exc:
            log.error("post-open action failed: %s", exc.detail())
            results.append(ActionResult(f"restart {service}", ok=False, error=exc.message))
    return results


def mount_nfs_shares() -> None:
    """Mount every NFS entry of /etc/fstab that is not mounted yet."""
    runner.run(["mount", "-a", "-t", "nfs,nfs4"], timeout=NFS_MOUNT_TIMEOUT)
