"""deploy/ansible's role, run by ansible-playbook against this machine as an operator runs it.

The guest has no network: the dependencies come from the wheelhouse `make test-vm` builds on
the host, where it also builds the luksctl wheel the role copies. /opt/luksctl is gone
(guest.sh's link to the VM prefix is set aside), so the role makes the venv and installs
everything itself. ansible-playbook runs from the VM prefix venv with a local connection.
Secrets reach it in a 0600 extra-vars file, never on a command line.

One host, a single VM: under emulation every task costs each host its share, and the cluster
run (a front end and one worker) took 2,700 s of the systemd boot in make test on 2026-12-06,
which took make test past 60 minutes. The cluster's tasks run for real on three local hosts in
tests/unit/test_ansible_role.py, and the fan-out to workers runs in tests/vm/cluster."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import string
import subprocess
import time
from pathlib import Path

import pytest
from helpers_vm import (
    API_CONFIG,
    CRYPTSETUP,
    LUKS_DIR,
    MOUNTPOINT,
    OUT,
    REPO,
    SERVICE_PATH,
    VOLUME_INI,
    Dashboard,
    assert_fastluks_on_roots_path,
    run,
    wait_until,
)

ANSIBLE_DIR = REPO / "deploy" / "ansible"
PREFIX = Path("/opt/luksctl")  # what the role installs into
UNIT = "luksctl-api.service"
SUCCESS_FILES = {Path("/var/run/fast-luks-encryption.success"): "LUKS encryption completed.",
                 Path("/var/run/fast-luks-volume-setup.success"): "Volume setup completed."}
# With what a failed setup leaves: its journal and the passphrase it keeps until it completes.
SETUP_FILES = [VOLUME_INI, LUKS_DIR / "luks-header.bck", LUKS_DIR / "setup-state.json",
               LUKS_DIR / "setup-pending-passphrase", *SUCCESS_FILES]
PROXY = "luksctl-proxy@luksctl-api.service"
REPORT_TIMER = "luksctl-report.timer"  # the front end's, as install.sh frontend enables it
ROLE_FILES = [API_CONFIG, Path("/etc/systemd/system") / UNIT, Path("/etc/systemd/system/luksctl-proxy@.service"),
              Path("/etc/systemd/system") / REPORT_TIMER, Path("/etc/systemd/system/luksctl-report.service"),
              LUKS_DIR / "gunicorn-cert.pem", LUKS_DIR / "gunicorn-key.pem"]
# guest.sh installs them for the other tests; the role must install them itself.
SUDOERS = [Path("/etc/sudoers.d/luksctl-api"), Path("/etc/sudoers.d/luksctl-api-wn")]
# Already root: no become (each sudo costs seconds under emulation).
LOCAL_HOST = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3", "ansible_become": False}
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class Playbook:
    """ansible-playbook site.yml from the VM prefix's venv; each run's output lands in OUT."""

    def __init__(self, vm_prefix: Path, workdir: Path) -> None:
        self.binary = vm_prefix / "venv" / "bin" / "ansible-playbook"
        self.workdir = workdir
        self.runs = 0

    def run(self, inventory: dict, extra_vars: dict) -> dict[str, dict[str, int]]:
        """Runs site.yml; returns the recap per host: {"localhost": {"changed": 0, ...}}."""
        self.runs += 1
        inventory_file = self.workdir / "inventory.json"
        inventory_file.write_text(json.dumps(inventory))
        vars_file = self.workdir / "vars.json"
        vars_file.touch(mode=0o600)
        vars_file.write_text(json.dumps(extra_vars))
        env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": str(self.workdir),
               "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
               # One process per task instead of a copy, then a run: process start-ups are the
               # expensive part under software emulation.
               "ANSIBLE_PIPELINING": "1", "ANSIBLE_LOCAL_TEMP": str(self.workdir / "tmp"),
               # become resets HOME to root's, and the guest's /root is read-only (TESTING-REAL.md).
               "ANSIBLE_REMOTE_TMP": str(self.workdir / "remote-tmp"),
               # Each task's duration, in OUT/ansible-junit.N/*.xml (without arguments: no secret).
               "ANSIBLE_CALLBACKS_ENABLED": "ansible.builtin.junit", "JUNIT_HIDE_TASK_ARGUMENTS": "1",
               "JUNIT_OUTPUT_DIR": str(OUT / f"ansible-junit.{self.runs}")}
        log = OUT / f"ansible.{self.runs}.log"
        started = time.monotonic()
        try:
            with log.open("wb") as out:  # written as it goes: a run under emulation takes minutes
                result = subprocess.run([str(self.binary), "-i", str(inventory_file), "-e", f"@{vars_file}", "site.yml"],
                                        cwd=ANSIBLE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
        finally:
            vars_file.unlink()
        with (OUT / "ansible-timings.jsonl").open("a") as timings:
            timings.write(json.dumps({"run": self.runs, "seconds": round(time.monotonic() - started, 1)}) + "\n")
        output = log.read_text(errors="replace")
        # The whole output: under emulation one run costs minutes, so one failure must tell all.
        assert result.returncode == 0, f"ansible-playbook exited {result.returncode} (log {log}):\n{output}"
        recap = {host: dict(zip(("ok", "changed", "unreachable", "failed"), map(int, counts)))
                 for host, *counts in RECAP.findall(output)}
        assert recap, f"no PLAY RECAP in {log}"
        return recap

    def output(self) -> str:
        return "".join((OUT / f"ansible.{n}.log").read_text(errors="replace") for n in range(1, self.runs + 1))


@pytest.fixture(scope="module")
def operator_machine(systemd):
    """No /opt/luksctl, as on a machine the role has never seen; afterwards the guest as before:
    the link to the VM prefix back, the role's unit stopped and removed, its files gone."""
    vm_prefix = Path(os.readlink(PREFIX))
    PREFIX.unlink()
    for path in SUDOERS:
        path.unlink()
    workdir = Path("/tmp/ansible-role-test")
    workdir.mkdir(mode=0o700)
    try:
        yield Playbook(vm_prefix, workdir)
    finally:
        systemd.save_journal(UNIT)
        systemd.save_journal(PROXY)
        systemd.systemctl("disable", "--now", UNIT, PROXY, REPORT_TIMER, check=False)
        for path in ROLE_FILES:
            path.unlink(missing_ok=True)
        run("systemctl", "daemon-reload")
        if PREFIX.is_dir() and not PREFIX.is_symlink():
            shutil.rmtree(PREFIX)
        PREFIX.unlink(missing_ok=True)
        PREFIX.symlink_to(vm_prefix)
        for path in SUDOERS:
            shutil.copy(REPO / "deploy" / "sudoers.d" / path.name, path)
            path.chmod(0o440)
        shutil.rmtree(workdir)


@pytest.fixture
def blank_device():
    """A zeroed 64 MiB loop device, as a cloud VM's new data volume; detached afterwards, with
    whatever setup made of it closed and its files removed."""
    image = Path("/srv") / f"ansible-blank-{secrets.token_hex(4)}.img"
    with image.open("xb") as f:
        f.truncate(64 * 1024 * 1024)
    loop = run("losetup", "--find", "--show", str(image)).stdout.decode().strip()
    yield loop
    if os.path.ismount(MOUNTPOINT):
        run("umount", str(MOUNTPOINT))
    for line in run("dmsetup", "ls", "--target", "crypt", check=False).stdout.decode().splitlines():
        name = line.split()[0]
        if loop in run(CRYPTSETUP, "status", name, check=False).stdout.decode():
            run(CRYPTSETUP, "close", name)
    run("losetup", "--detach", loop, check=False)
    image.unlink()
    for link in Path("/dev/disk/by-uuid").glob("*"):
        if link.is_symlink() and os.readlink(link).endswith(f"/{Path(loop).name}"):
            link.unlink()
    for path in SETUP_FILES:
        path.unlink(missing_ok=True)


def role_vars(playbook: Playbook, device: str, bao, secret_path: str) -> dict:
    """What the orchestrator passes: the volume, the deployment's Vault location and token."""
    vm_prefix = playbook.binary.parents[2]
    wheelhouse = vm_prefix / "wheelhouse"  # the dependencies (scripts/build-wheelhouse.sh)
    [wheel] = (vm_prefix / "dist").glob("luksctl-*.whl")  # built by make test-vm, as README says
    return {
        "device": device, "cryptdev": "".join(secrets.choice(string.ascii_lowercase) for _ in range(8)),
        "mountpoint": str(MOUNTPOINT), "vault_url": bao.url, "vault_wrapping_token": bao.write_only_wrapping_token(),
        "vault_secret_path": secret_path, "vault_secret_key": "storage_encryption_key",
        "luksctl_wheel": str(wheel), "luksctl_pip_extra_args": f"--no-index --find-links {wheelhouse}",
        # The guest has every package and no network; apt's check that they are there costs ~7
        # plain module runs (natively 2.7 s against 0.4 s), minutes under emulation. The package
        # step runs on the host instead, in check mode (tests/unit/test_ansible_role.py).
        "luksctl_install_packages": False,
        # Fast PBKDF for tests only; the role's default is cryptsetup's own (argon2id).
        "luksctl_setup_extra_args": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--vault-allow-http"],
    }


def unlock(dashboard: Dashboard, bao, device: str, secret_path: str) -> dict:
    """The dashboard's unlock flow after a close, with its read-only wrapping token and the
    secret setup stored; returns the answer. (No udev in the guest: make the link it would.)"""
    run("/usr/local/sbin/luksctl", "close")
    assert dashboard.status().state == "unmounted"
    uuid = run(CRYPTSETUP, "luksUUID", device).stdout.decode().strip()
    by_uuid = Path("/dev/disk/by-uuid") / uuid
    by_uuid.parent.mkdir(parents=True, exist_ok=True)
    by_uuid.unlink(missing_ok=True)
    by_uuid.symlink_to(Path("../..") / Path(device).name)
    reply = dashboard.open({"vault_url": bao.url, "vault_token": bao.wrap_token(), "secret_root": "secrets",
                            "secret_path": secret_path, "secret_key": "storage_encryption_key"})
    assert (reply.response.status_code, reply.state) == (200, "mounted"), reply.response.text
    return reply.response.json()


def answers(dashboard: Dashboard) -> bool:
    try:
        return dashboard.status().response.status_code == 200
    except (OSError, ValueError):
        return False


def single_vm() -> dict:
    # OpenBao listens on plain http:// here: the API may reach it only with ALLOW_PLAIN_HTTP.
    return {"all": {"children": {"luksctl_frontend": {"hosts": {"localhost": {
        **LOCAL_HOST, "luksctl_api_extra_config": {"ALLOW_PLAIN_HTTP": True}}}}}}}


def test_a_single_vm_from_a_blank_device_installed_encrypted_and_served_then_the_dashboards_unlock(
        operator_machine, systemd, bao_up, blank_device):
    """The role's one run from nothing. A second run is not made here: it costs minutes under
    emulation. The host runs the config and cluster tasks twice (tests/unit/test_ansible_role.py)."""
    playbook = operator_machine
    secret_path = f"user-sub/{secrets.token_hex(8)}/storage_encryption"
    extra_vars = role_vars(playbook, blank_device, bao_up, secret_path)
    wrapping_token = extra_vars["vault_wrapping_token"]

    first = playbook.run(single_vm(), extra_vars)

    assert first["localhost"]["failed"] == 0 and first["localhost"]["changed"] > 0, first
    # Installed as install.sh installs: a venv of our own, the sudoers path linked to it.
    assert PREFIX.is_dir() and not PREFIX.is_symlink()
    assert (PREFIX / "venv" / ".luksctl-installed-from").is_file()
    assert os.readlink("/usr/local/sbin/luksctl") == str(PREFIX / "venv" / "bin" / "luksctl")
    assert_fastluks_on_roots_path(PREFIX)
    sudoers = Path("/etc/sudoers.d/luksctl-api")
    assert sudoers.read_bytes() == (REPO / "deploy" / "sudoers.d" / "luksctl-api").read_bytes()
    assert oct(sudoers.stat().st_mode & 0o777) == "0o440"
    assert json.loads(API_CONFIG.read_text()) == {"INFRASTRUCTURE_CONFIGURATION": "single_vm",
                                                   "VAULT_URL_ALLOWLIST": [bao_up.url], "ALLOW_PLAIN_HTTP": True}
    # Encrypted by luksctl setup with the deployment's write-only token, which is now spent.
    for path, text in SUCCESS_FILES.items():
        assert path.read_text().strip() == text
    assert not bao_up.lookup_wrapping(wrapping_token)
    assert f"cryptdev = {extra_vars['cryptdev']}" in VOLUME_INI.read_text()
    # The service, started by systemd as its own user, behind the proxy, with the report timer.
    main_pid = systemd.show(UNIT, "MainPID")
    uid = int(Path(f"/proc/{main_pid}/status").read_text().split("Uid:")[1].split()[0])
    assert pwd.getpwuid(uid).pw_name == "luksctl_api"
    assert systemd.systemctl("is-enabled", PROXY) == "enabled"  # port 5000 is the proxy's
    assert systemd.systemctl("is-enabled", REPORT_TIMER) == "enabled" and systemd.systemctl("is-active", REPORT_TIMER) == "active"

    dashboard = Dashboard("https://127.0.0.1:5000")
    wait_until(lambda: answers(dashboard), 120, UNIT)
    assert dashboard.status().state == "mounted"  # setup leaves it mounted
    assert unlock(dashboard, bao_up, blank_device, secret_path) == {"volume_state": "mounted"}
    assert wrapping_token not in playbook.output()
