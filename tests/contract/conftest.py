"""Fixtures: the two apps in-process with the fakes of contract_fakes.py installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from contract_fakes import ALLOWED_VAULT, CLUSTER_TOKEN, INI, NFS_MOUNTPOINTS, Host

from luksctl import vault
from luksctl.api import create_frontend_app, create_worker_app
from luksctl.api import frontend as frontend_module
from luksctl.api import worker as worker_module
from luksctl.config import FrontendConfig, WorkerConfig


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Host:
    fake = Host()
    monkeypatch.setattr(frontend_module, "volume_status", fake.volume_status)
    monkeypatch.setattr(worker_module, "nfs_mount_states", fake.nfs_mount_states)
    monkeypatch.setattr(vault, "fetch_passphrase", fake.fetch_passphrase)
    return fake


@pytest.fixture
def frontend_config(tmp_path: Path) -> FrontendConfig:
    ini = tmp_path / "luks-cryptdev.ini"
    ini.write_text(INI)
    return FrontendConfig(
        CRYPTDEV_INI=str(ini),
        LOCK_FILE=str(tmp_path / "open.lock"),
        FAILED_OPEN_LIMIT=0,  # the limiter would 429 the fuzzer
        VAULT_URL_ALLOWLIST=[ALLOWED_VAULT],
        PRIVILEGED_TIMEOUT=5,
    )


@pytest.fixture
def worker_config(tmp_path: Path) -> WorkerConfig:
    token = tmp_path / "cluster-token"
    token.write_text(CLUSTER_TOKEN + "\n")
    token.chmod(0o640)  # as install.sh leaves it
    return WorkerConfig(NFS_MOUNTPOINT_LIST=NFS_MOUNTPOINTS, CLUSTER_TOKEN_FILE=str(token))


@pytest.fixture
def frontend_app(host: Host, frontend_config: FrontendConfig):
    return create_frontend_app(frontend_config, host)


@pytest.fixture
def worker_app(tmp_path: Path, host: Host, worker_config: WorkerConfig):
    return create_worker_app(worker_config, host, tmp_path)
