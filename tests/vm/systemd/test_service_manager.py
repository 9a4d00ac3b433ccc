"""Post-open actions against a real service manager: systemd is PID 1 in this boot.

The API runs from deploy/luksctl-api.service, unchanged. luksctl's `systemctl restart` calls
reach the real PID 1, which stops and starts real units. docker.service is a stand-in for
dockerd that records, each time it starts, what backs the mountpoint Docker keeps its files on.
"""

from __future__ import annotations

import pwd
import re
from pathlib import Path

import pytest
from helpers_vm import MOUNTPOINT
DOCKER_STARTS = Path("/run/docker-starts")
NOT_MOUNTED = "not-mounted"


def docker_unit(start_check: str) -> str:
    return (
        "[Unit]\n"
        f"Description=Stand-in for dockerd: records what backs {MOUNTPOINT} at each start\n\n"
        "[Service]\n"
        f"ExecStartPre=/bin/sh -c 'findmnt --noheadings --output SOURCE --mountpoint {MOUNTPOINT}"
        f" >>{DOCKER_STARTS} || echo {NOT_MOUNTED} >>{DOCKER_STARTS}'\n"
        f"ExecStartPre={start_check}\n"
        "ExecStart=/bin/sleep infinity\n"
    )


def docker_starts() -> list[str]:
    return DOCKER_STARTS.read_text().split()


@pytest.fixture
def docker(systemd):
    """install(start_check): a docker.service that is running, started before any unlock."""

    def install(start_check: str = "/bin/true") -> None:
        DOCKER_STARTS.write_text("")
        systemd.install("docker.service", docker_unit(start_check))
        systemd.systemctl("start", "docker.service", check=False)

    yield install
    systemd.save_journal("docker.service")
    systemd.systemctl("stop", "docker.service", check=False)
    DOCKER_STARTS.unlink(missing_ok=True)


def test_the_shipped_unit_runs_the_api_as_its_own_user_without_core_dumps_or_swap(frontend, systemd, api_unit,
                                                                                   luks_volume):
    luks_volume()
    dashboard = frontend({"INFRASTRUCTURE_CONFIGURATION": "single_vm"})

    assert dashboard.status().state == "unmounted"
    assert systemd.systemctl("is-active", api_unit) == "active"
    main_pid = systemd.show(api_unit, "MainPID")
    uid = int(Path(f"/proc/{main_pid}/status").read_text().split("Uid:")[1].split()[0])
    assert pwd.getpwuid(uid).pw_name == "luksctl_api"
    # RuntimeDirectory= made by systemd itself, where the shared open lock lives.
    runtime = Path("/run/luksctl-api")
    assert runtime.is_dir() and pwd.getpwuid(runtime.stat().st_uid).pw_name == "luksctl_api"
    # LimitCORE=0 and MemorySwapMax=0 as the kernel applies them (sudo luksctl inherits both).
    limits = Path(f"/proc/{main_pid}/limits").read_text()
    assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.MULTILINE), limits
    cgroup = Path(f"/proc/{main_pid}/cgroup").read_text().strip()
    assert cgroup == f"0::/system.slice/{api_unit}", cgroup  # cgroup v2, the unit's own group
    assert (Path("/sys/fs/cgroup/system.slice") / api_unit / "memory.swap.max").read_text().strip() == "0"


def test_docker_mode_restarts_docker_after_the_volume_is_mounted(frontend, systemd, docker, bao_up,
                                                                 luks_volume):
    volume = luks_volume()
    docker()
    assert docker_starts() == [NOT_MOUNTED]  # as at boot: dockerd up on the empty directory
    dashboard = frontend({"INFRASTRUCTURE_CONFIGURATION": "single_vm", "VIRTUALIZATION_TYPE": "docker"})
    secret_path = bao_up.store_passphrase("user-sub", volume.uuid, volume.passphrase.decode())

    reply = dashboard.open(bao_up.open_payload(secret_path))

    assert (reply.response.status_code, reply.state) == (200, "mounted"), reply.response.text
    # systemd started docker again, and at that start the encrypted volume backed the mountpoint.
    assert docker_starts() == [NOT_MOUNTED, volume.mapper]
    assert systemd.systemctl("is-active", "docker.service") == "active"


def test_a_docker_that_fails_to_start_is_reported_and_the_volume_stays_mounted(frontend, systemd, docker,
                                                                               bao_up, luks_volume):
    volume = luks_volume()
    # Starts while the volume is locked; refuses once it is mounted.
    docker(f"/bin/sh -c '! mountpoint -q {MOUNTPOINT}'")
    dashboard = frontend({"INFRASTRUCTURE_CONFIGURATION": "single_vm", "VIRTUALIZATION_TYPE": "docker"})
    secret_path = bao_up.store_passphrase("user-sub", volume.uuid, volume.passphrase.decode())

    reply = dashboard.open(bao_up.open_payload(secret_path))

    assert reply.response.status_code == 500, reply.response.text
    assert reply.state == "mounted"
    assert "restart docker" in reply.response.json()["error"]
    assert docker_starts() == [NOT_MOUNTED, volume.mapper]  # systemd did try, after the mount
    assert systemd.systemctl("is-active", "docker.service", check=False) == "failed"
    assert dashboard.status().state == "mounted"


def test_cluster_mode_restarts_the_real_nfs_server_after_the_mount(frontend, systemd, bao_up, luks_volume):
    volume = luks_volume()
    nfs = "nfs-server.service"  # Debian's nfs-kernel-server.service is an alias of it
    systemd.systemctl("start", nfs)  # an earlier test of this boot may have left it stopped
    assert systemd.systemctl("is-active", nfs) == "active"
    started_before = int(systemd.show(nfs, "ActiveEnterTimestampMonotonic"))
    # 192.0.2.1 (TEST-NET-1) cannot be reached from the guest: the worker part fails fast and
    # must not fail the front end's own open.
    dashboard = frontend({"INFRASTRUCTURE_CONFIGURATION": "cluster", "WN_IPS": ["192.0.2.1"],
                          "WN_CONNECT_TIMEOUT": 2})
    secret_path = bao_up.store_passphrase("user-sub", volume.uuid, volume.passphrase.decode())

    reply = dashboard.open(bao_up.open_payload(secret_path))

    assert (reply.response.status_code, reply.state) == (200, "mounted"), reply.response.text
    assert reply.response.json()["nodes"] == {"192.0.2.1": "unreachable"}
    assert int(systemd.show(nfs, "ActiveEnterTimestampMonotonic")) > started_before
    assert systemd.systemctl("is-active", nfs) == "active"
