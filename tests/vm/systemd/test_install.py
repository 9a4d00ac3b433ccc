"""deploy/install.sh end to end, as README's "Install on a VM" has an operator run it: from a
clone, on a machine where systemd is PID 1, offline from the wheelhouse the host built
(scripts/build-wheelhouse.sh, called by `make test-vm`). Then a restart, and a second install
that must change none of the operator's files."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers_vm import API_CONFIG, LUKS_DIR, OUT, PREFIX, REPO, SERVICE_PATH, Dashboard, assert_fastluks_on_roots_path, run, wait_until
from support.secret_file import write_secret_file

UNIT = "luksctl-api.service"
PROXY_UNIT_FILE, PROXY = "luksctl-proxy@.service", "luksctl-proxy@luksctl-api.service"
REPORT_TIMER, REPORT_SERVICE = "luksctl-report.timer", "luksctl-report.service"  # install.sh frontend enables the timer too
UNIT_DIR = Path("/etc/systemd/system")
SOURCE = Path("/srv/luksctl-src")  # the operator's clone; pip builds the package inside it
WHEELHOUSE = PREFIX.resolve() / "wheelhouse"  # next to the test venv guest.sh links /opt/luksctl to
CERT, KEY, TOKEN = LUKS_DIR / "gunicorn-cert.pem", LUKS_DIR / "gunicorn-key.pem", LUKS_DIR / "cluster-token"
OPERATOR_FILES = (API_CONFIG, CERT, KEY, TOKEN)  # what a reinstall must keep as it is
SUDOERS = Path("/etc/sudoers.d/luksctl-api")
VAULT_URL = "https://vault.example:8200"  # what `--vault-url` puts in VAULT_URL_ALLOWLIST
INSTALL_TIMEOUT = 1200  # a first install under software emulation took 3.5 min on an idle host


def install(run_number: int) -> subprocess.CompletedProcess:
    """`sudo deploy/install.sh frontend single_vm` from the clone, offline."""
    args = ["frontend", "single_vm", "--vault-url", VAULT_URL]
    home = Path("/tmp/install-home")
    home.mkdir(exist_ok=True)
    env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": str(home), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(WHEELHOUSE), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(["bash", str(SOURCE / "deploy" / "install.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=INSTALL_TIMEOUT, cwd="/")
    (OUT / f"install.{run_number}.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"install.sh exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def snapshot(paths) -> dict:
    """Content, owner, mode and mtime of each file: a reinstall must change none of them."""
    found = {}
    for path in paths:
        info = path.lstat()
        found[path] = (hashlib.sha256(path.read_bytes()).hexdigest(), info.st_uid, info.st_gid, oct(info.st_mode),
                       info.st_mtime_ns)
    return found


def owner_and_mode(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name, oct(info.st_mode & 0o7777)


def answering(systemd) -> Dashboard:
    dashboard = Dashboard("https://127.0.0.1:5000")

    def answers() -> bool:
        try:
            return dashboard.status().response.status_code == 200
        except (OSError, ValueError):
            return False

    wait_until(answers, 120, f"{UNIT} on {dashboard.base_url}")
    return dashboard


def main_pid_user(systemd) -> tuple[int, str]:
    pid = int(systemd.show(UNIT, "MainPID"))
    uid = int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
    return pid, pwd.getpwuid(uid).pw_name


@pytest.fixture
def operator_machine(systemd):
    """The guest as a machine without luksctl: /opt/luksctl is no link to the test venv and
    /etc/luks holds no service files. Everything is put back for the tests after this one."""
    assert WHEELHOUSE.is_dir(), f"no wheelhouse at {WHEELHOUSE}: run scripts/build-wheelhouse.sh on the host"
    test_prefix = PREFIX.resolve()
    saved = {path: (path.read_bytes(), path.stat()) for path in (*OPERATOR_FILES, SUDOERS) if path.exists()}
    PREFIX.unlink()
    for path in OPERATOR_FILES:
        path.unlink(missing_ok=True)
    shutil.rmtree(SOURCE, ignore_errors=True)
    shutil.copytree(REPO, SOURCE, ignore=shutil.ignore_patterns(
        ".git", ".venv", "vm-out*", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests"))
    yield
    systemd.save_journal(UNIT)
    systemd.save_journal(PROXY)
    systemd.systemctl("disable", "--now", UNIT, PROXY, REPORT_TIMER, check=False)
    for unit in (UNIT, PROXY_UNIT_FILE, REPORT_TIMER, REPORT_SERVICE):
        (UNIT_DIR / unit).unlink(missing_ok=True)
    systemd.systemctl("daemon-reload")
    if PREFIX.is_symlink() or not PREFIX.exists():
        PREFIX.unlink(missing_ok=True)
    else:
        shutil.rmtree(PREFIX)
    PREFIX.symlink_to(test_prefix)
    for path in (*OPERATOR_FILES, SUDOERS):
        path.unlink(missing_ok=True)
        if path in saved:
            content, info = saved[path]
            path.write_bytes(content)
            os.chown(path, info.st_uid, info.st_gid)
            path.chmod(info.st_mode & 0o7777)
    shutil.rmtree(SOURCE, ignore_errors=True)


def test_install_sh_installs_a_running_service_and_a_reinstall_keeps_config_cert_and_token(operator_machine, systemd):
    token = secrets.token_hex(32) + "\n"
    write_secret_file(TOKEN, token.strip())  # copied here by the operator (README, cluster deployment step 4)

    first = install(1)

    # README, "Install on a VM", steps 1-8.
    assert PREFIX.is_dir() and not PREFIX.is_symlink()
    assert "home = /usr/bin" in (PREFIX / "venv" / "pyvenv.cfg").read_text()
    assert os.readlink("/usr/local/sbin/luksctl") == "/opt/luksctl/venv/bin/luksctl"
    assert_fastluks_on_roots_path(PREFIX)
    assert pwd.getpwnam("luksctl_api").pw_shell == "/usr/sbin/nologin"
    assert SUDOERS.read_bytes() == (SOURCE / "deploy" / "sudoers.d" / "luksctl-api").read_bytes()
    assert owner_and_mode(SUDOERS) == ("root", "root", "0o440")
    sample = json.loads((SOURCE / "deploy" / "config" / "single_vm.json").read_text())
    assert json.loads(API_CONFIG.read_text()) == {**sample, "VAULT_URL_ALLOWLIST": [VAULT_URL]}
    assert "wrote /etc/luks/config.json" in first.stdout
    assert owner_and_mode(API_CONFIG) == ("root", "root", "0o644")
    assert owner_and_mode(CERT)[::2] == ("root", "0o644")
    assert owner_and_mode(KEY)[::2] == ("root", "0o600")  # nginx's master reads it as root
    assert (TOKEN.read_text(), owner_and_mode(TOKEN)) == (token, ("root", "luksctl_api", "0o640"))
    assert (UNIT_DIR / UNIT).read_bytes() == (SOURCE / "deploy" / UNIT).read_bytes()
    assert systemd.systemctl("is-enabled", UNIT) == "enabled"
    assert systemd.systemctl("is-active", UNIT) == "active"
    assert (UNIT_DIR / PROXY_UNIT_FILE).read_bytes() == (SOURCE / "deploy" / PROXY_UNIT_FILE).read_bytes()
    assert systemd.systemctl("is-enabled", PROXY) == "enabled"
    assert systemd.systemctl("is-active", PROXY) == "active"
    assert "luksctl_api" in run("id", "-nG", "luksctl_proxy").stdout.decode().split()
    dashboard = answering(systemd)
    assert "volume_state" in dashboard.status().response.json()
    first_pid, user = main_pid_user(systemd)
    assert user == "luksctl_api"

    systemd.systemctl("restart", UNIT)
    answering(systemd)
    restarted_pid, user = main_pid_user(systemd)
    assert restarted_pid != first_pid and user == "luksctl_api"

    # The operator edits the config; the second install must keep it, and everything else.
    API_CONFIG.write_text('{"INFRASTRUCTURE_CONFIGURATION": "single_vm", "FAILED_OPEN_LIMIT": 4}\n')
    before = snapshot(OPERATOR_FILES)

    second = install(2)

    assert snapshot(OPERATOR_FILES) == before
    assert "wrote /etc/luks/config.json" not in second.stdout
    assert systemd.systemctl("is-active", UNIT) == "active"
    answering(systemd)
    assert main_pid_user(systemd)[1] == "luksctl_api"
