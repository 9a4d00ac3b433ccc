"""Shared by every layer: `lab`, a real LUKS2 header on an image file (luks_lab.py), and the run
policy (run_policy.py): a skip or an xfail fails the run unless ALLOWED_SKIPS names the test, and
so does an xpass."""

from __future__ import annotations

import pytest

from luks_lab import Lab
from run_policy import RunPolicy

# Test id -> why it may skip. None may today: the one skip in the host tests, visudo missing
# (tests/unit/test_deploy.py), means the host lacks sudo, which `make test` installs.
ALLOWED_SKIPS: dict[str, str] = {}


def pytest_configure(config):
    config.pluginmanager.register(RunPolicy(ALLOWED_SKIPS), "luksctl-run-policy")


@pytest.fixture
def lab(tmp_path, monkeypatch) -> Lab:
    return Lab(tmp_path, monkeypatch)
