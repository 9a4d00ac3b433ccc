"""Fixtures for the cluster tests: a front end and three worker hosts in one VM (cluster_lab.py).

The lab (network namespaces, NFS server, three worker services) is started once per session
(../conftest.py's worker_lab, which the metrics test scrapes too); each test gets every worker running with the right token and unmounted, the NFS server up, and
a fresh encrypted volume, and leaves the workers unmounted and the NFS server stopped so the
volume can be unmounted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import requests

from cluster_lab import Lab, WorkerNode, record_timing  # noqa: F401 (test_cluster.py imports record_timing from here)
from helpers_vm import Api, Bao, Dashboard, unverified_request

# The connect timeout is small; the read timeout must cover a real remount under software
# emulation: three concurrent `sudo luksctl nfs-mount` took ~31 s each here, so 20 s was too
# short. 60 s is the product's default.
WN_CONNECT_TIMEOUT = 2
WN_READ_TIMEOUT = 60


@dataclass
class Cluster:
    lab: Lab
    api: Api
    bao: Bao
    dashboard: Dashboard
    volumes: object

    @property
    def workers(self) -> list[WorkerNode]:
        return self.lab.workers

    def nodes(self) -> requests.Response:
        return unverified_request("GET", f"{self.api.base_url}/luksctl_api/v1.0/nodes", timeout=300)

    def open(self):
        """A fresh volume, its passphrase in Bao, and the dashboard's open: (reply, seconds)."""
        volume = self.volumes("cluster passphrase")
        secret_path = self.bao.store_passphrase("cluster-sub", volume.uuid, "cluster passphrase")
        payload = self.bao.open_payload(secret_path)
        started = time.time()
        reply = self.dashboard.open(payload)
        return reply, started, time.time()


@pytest.fixture
def cluster(worker_lab, api_server, luks_volume, bao_up):
    """Every worker up with the front end's token, unmounted; the front end in cluster mode."""
    lab = worker_lab
    lab.restart_stale_workers()
    lab.unmount_workers()
    # FANOUT_MIN_INTERVAL 0: each test asks for the workers' state after changing it.
    config = lab.frontend_config(WN_CONNECT_TIMEOUT=WN_CONNECT_TIMEOUT, WN_READ_TIMEOUT=WN_READ_TIMEOUT,
                                 VAULT_URL_ALLOWLIST=[bao_up.url], ALLOW_PLAIN_HTTP=True, FANOUT_MIN_INTERVAL=0)
    if api_server.proc is None or api_server.proc.poll() is not None:
        api_server.start(config)
    elif api_server.config != config:
        api_server.restart(config)
    if not lab.nfs.running:
        lab.nfs.start()
    lab.systemctl.clear()
    dashboard = Dashboard(api_server.base_url)
    dashboard.timeout = 300  # an open plus three remounts, under software emulation
    yield Cluster(lab, api_server, bao_up, dashboard, luks_volume)
    # Before luks_volume's cleanup unmounts the volume: nothing may hold the export.
    lab.unmount_workers()
    lab.nfs.stop()
