"""Fixtures for the boot where systemd is PID 1 (scripts/vm-run.sh test-systemd).

The services run exactly as an operator's machine runs them: deploy/'s unit files, started
and restarted by systemd itself, logging to the journal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_vm import API_CONFIG, LUKS_DIR, OUT, REPO, VENV_BIN, Dashboard, run, wait_until

UNIT_DIR = Path("/etc/systemd/system")  # a throw-away overlay in the guest
BASE_URL = "https://127.0.0.1:5000"


class Systemd:
    """The guest's PID 1, through systemctl and journalctl."""

    def __init__(self) -> None:
        self.installed: list[Path] = []

    def install(self, name: str, text: str) -> None:
        path = UNIT_DIR / name
        path.write_text(text)
        self.installed.append(path)
        run("systemctl", "daemon-reload")

    def systemctl(self, *args: str, check: bool = True) -> str:
        return run("systemctl", *args, check=check).stdout.decode().strip()

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "--value", "--property", prop, unit)

    def save_journal(self, unit: str) -> None:
        journal = run("journalctl", "--no-pager", "--unit", unit, check=False).stdout
        (OUT / f"journal.{unit}.log").write_bytes(journal)

    def remove_installed(self) -> None:
        for path in self.installed:
            self.systemctl("stop", path.name, check=False)
            path.unlink(missing_ok=True)
        self.installed.clear()  # a template unit (name@.service) has no state: its instances stop with their service
        run("systemctl", "daemon-reload")


@pytest.fixture(scope="session")
def systemd():
    # Without this check every test below could pass on a boot where systemctl talks to no one.
    comm = Path("/proc/1/comm").read_text().strip()
    assert comm == "systemd", f"PID 1 is {comm!r}: run these tests with `scripts/vm-run.sh test-systemd`"
    manager = Systemd()
    yield manager
    manager.remove_installed()


@pytest.fixture
def api_unit(systemd):
    """deploy/luksctl-api.service and its proxy's template unit, installed unchanged; tests write
    config.json and restart it (which restarts the proxy: PartOf=). Installed for each test:
    test_install.py's operator machine removes them when it is done."""
    systemd.install("luksctl-proxy@.service", (REPO / "deploy" / "luksctl-proxy@.service").read_text())
    systemd.install("luksctl-api.service", (REPO / "deploy" / "luksctl-api.service").read_text())
    yield "luksctl-api.service"
    systemd.save_journal("luksctl-api.service")


@pytest.fixture
def frontend(api_unit, systemd, bao):
    """configure(config) writes config.json (OpenBao, plain http://, in its VAULT_URL_ALLOWLIST), restarts the
    unit and waits until it answers."""

    def configure(config: dict) -> Dashboard:
        config = {"VAULT_URL_ALLOWLIST": [bao.url], "ALLOW_PLAIN_HTTP": True, **config}
        if not (LUKS_DIR / "gunicorn-key.pem").exists():
            run(str(VENV_BIN / "luksctl-api"), "gen-cert")
        API_CONFIG.write_text(json.dumps(config))
        API_CONFIG.chmod(0o644)
        systemd.systemctl("restart", api_unit)
        dashboard = Dashboard(BASE_URL)

        def answers() -> bool:
            try:
                return dashboard.status().response.status_code == 200
            except (OSError, ValueError):  # refused, or not yet the API's JSON
                return False

        wait_until(answers, 120, f"{api_unit} on {BASE_URL}")
        return dashboard

    return configure


@pytest.fixture(scope="session")
def recordable_processes():
    """Overrides the main boot's: no leak test runs in this boot, and `auditctl -s` fails under it."""
