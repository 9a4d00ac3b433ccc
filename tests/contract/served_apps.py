"""The two apps as gunicorn serves them behind the proxy in test_schemathesis.py's proxied runs:
config.json from LUKSCTL_API_CONFIG, and contract_fakes.Host in place of the kernel, Vault and
sudo, installed at the same seams as the in-process fixtures (conftest.host).

gunicorn loads them as `served_apps:frontend()` / `served_apps:worker()` with tests/contract on
PYTHONPATH; the worker's runtime directory is `run` next to its config.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from contract_fakes import Host

from luksctl import vault
from luksctl.api import frontend as frontend_module
from luksctl.api import worker as worker_module
from luksctl.config import FrontendConfig, WorkerConfig, load_api_config


def frontend():
    host = Host()
    frontend_module.volume_status = host.volume_status
    vault.fetch_passphrase = host.fetch_passphrase
    return frontend_module.create_frontend_app(load_api_config(FrontendConfig), host)


def worker():
    host = Host()
    worker_module.nfs_mount_states = host.nfs_mount_states
    runtime = Path(os.environ["LUKSCTL_API_CONFIG"]).parent / "run"
    return worker_module.create_worker_app(load_api_config(WorkerConfig), host, runtime)
