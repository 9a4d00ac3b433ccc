"""README: "Check a file with `luksctl-api check-config` (worker: `luksctl-api-wn check-config`)",
run as the installed commands, as install.sh runs them before it (re)starts a service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
DEPLOY_CONFIG = Path(__file__).parents[2] / "deploy" / "config"


def check_config(command: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), "check-config"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "LUKSCTL_API_CONFIG": str(config)})


@pytest.mark.parametrize("command, sample", [("luksctl-api", "single_vm.json"), ("luksctl-api", "cluster.json"),
                                             ("luksctl-api-wn", "worker.json")])
def test_every_shipped_sample_passes(command, sample):
    result = check_config(command, DEPLOY_CONFIG / sample)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{DEPLOY_CONFIG / sample}: OK "), result.stdout


@pytest.mark.parametrize("command, config, key", [
    ("luksctl-api", {"INFRASTRUCTURE_CONFIGURATION": "cluster"}, "WN_IPS"),
    ("luksctl-api-wn", {"NFS_MOUNTPOINT_LIST": ["/home"], "WN_IPS": []}, "WN_IPS"),  # a front-end key
    ("luksctl-api-wn", {}, "NFS_MOUNTPOINT_LIST"),
])
def test_a_bad_config_exits_3_naming_the_file_and_the_key(tmp_path, command, config, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))

    result = check_config(command, path)

    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"{command}: {path}"), result.stderr
    assert key in result.stderr, result.stderr


def lock_file_config(tmp_path: Path, lock_file: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"LOCK_FILE": str(lock_file)}))
    return path


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777], ids=oct)
def test_a_lock_directory_others_may_write_to_exits_3(tmp_path, mode):
    """It holds the rate limiter's sqlite file and the fan-out results: anyone who writes there forges them."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)

    result = check_config("luksctl-api", lock_file_config(tmp_path, shared / "open.lock"))

    assert result.returncode == 3 and f"{shared} must be a directory of the service user" in result.stderr, result.stderr


def test_a_lock_directory_not_made_yet_passes_check_config(tmp_path):
    """systemd makes RuntimeDirectory= when the unit starts (the Ansible role validates config.json
    before that); the services check the directory again when they start."""
    result = check_config("luksctl-api", lock_file_config(tmp_path, tmp_path / "runtime" / "open.lock"))

    assert result.returncode == 0, result.stderr


def test_a_private_lock_directory_passes(tmp_path):
    private = tmp_path / "runtime"
    private.mkdir(mode=0o750)

    result = check_config("luksctl-api", lock_file_config(tmp_path, private / "open.lock"))

    assert result.returncode == 0, result.stderr
