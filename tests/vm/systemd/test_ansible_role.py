"""deploy/ansible's role, run by ansible-playbook against this machine as an operator runs it.

The guest has no network: the dependencies come from the wheelhouse `make test-vm` builds on
the host, where it also builds the luksctl wheel the role copies. /opt/luksctl starts empty
(guest.sh's link to the VM prefix is set aside), so the role makes the venv and installs
everything itself. ansible-playbook runs from the VM prefix venv with a local connection.
Secrets reach it in a 0600 extra-vars file, never on a command line."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))  # the cluster lab's worker hosts

from cluster_lab import CA_BUNDLE, FRONT_IP, FRONT_TOKEN, FSTAB, LAB_BRIDGE, NFS_MNT, WorkerNode  # noqa: E402
from helpers_vm import (  # noqa: E402
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
ROLE_FILES = [API_CONFIG, Path("/etc/systemd/system") / UNIT, Path("/etc/systemd/system/luksctl-api-wn.service"),
              Path("/etc/systemd/system/luksctl-proxy@.service"), Path("/etc/systemd/system") / REPORT_TIMER,
              Path("/etc/systemd/system/luksctl-report.service"),
              LUKS_DIR / "gunicorn-cert.pem", LUKS_DIR / "gunicorn-key.pem"]
# guest.sh installs them for the other tests; the role must install them itself.
SUDOERS = [Path("/etc/sudoers.d/luksctl-api"), Path("/etc/sudoers.d/luksctl-api-wn")]
EXPORTS = Path("/etc/exports")
LAB_ROOT = Path("/srv/ansible-lab")
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
    """/opt/luksctl empty, as on a machine the role has never seen; afterwards the guest as before:
    the link to the VM prefix back, the role's unit stopped and removed, its files gone."""
    vm_prefix = Path(os.readlink(PREFIX))
    PREFIX.unlink()
    PREFIX.mkdir(mode=0o755)  # where each worker mounts its own (RoleWorker)
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


# --- cluster: the front end here, a worker in network namespaces ------------------------------

# Runs as root in the node's new mount and UTS namespaces: $1 hostname, $2 its /etc/luks,
# $3 and $4 the upper and work directories of its /etc, $5 and $6 the worker service's uid/gid,
# $7 its /opt/luksctl.
NODE_BOOT = r"""
set -e
hostname "$1"
mount -t overlay node-etc -o lowerdir=/etc,upperdir="$3",workdir="$4" /etc
printf '127.0.1.1 %s\n' "$1" >>/etc/hosts  # as a real host resolves its own name (sudo looks it up)
mount --bind "$2" /etc/luks
mount --bind "$7" /opt/luksctl
mkdir -p /run/luksctl-api-wn
mount -t tmpfs -o mode=0750,uid="$5",gid="$6" node-run /run/luksctl-api-wn
"""


def copy_files_mounted_in_etc(upper: Path) -> None:
    """Copies into the overlay's upper directory the files mounted over /etc's own: virtme
    bind-mounts /etc/shadow and /etc/fstab, among others. An overlay sees the file beneath
    such a mount, not the mount: without this the node's /etc/shadow was the host's original,
    without the service user's line guest.sh added, and PAM refused the worker's sudo
    ("account validation failure, is your account locked?")."""
    etc = Path("/etc")
    mounts = {Path(line.split()[4].replace("\\040", " ")) for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    for target in sorted(path for path in mounts if path.is_relative_to(etc) and path != etc and path.is_file()):
        copy = upper / target.relative_to(etc)
        for directory in reversed(target.relative_to(etc).parents[:-1]):  # as /etc has them
            if not (upper / directory).exists():
                (upper / directory).mkdir()
                shutil.copystat(etc / directory, upper / directory)
                os.chown(upper / directory, (etc / directory).stat().st_uid, (etc / directory).stat().st_gid)
        shutil.copy2(target, copy)
        os.chown(copy, target.stat().st_uid, target.stat().st_gid)


class RoleWorker(WorkerNode):
    """A worker host for the role: netns wnN, plus a mount and a UTS namespace kept open in
    files. There /etc is an overlay whose changes (fstab, the sudoers rule, the unit) are the
    node's own, /etc/luks and /opt/luksctl are the node's own directories, and
    /run/luksctl-api-wn the unit's RuntimeDirectory=. Every other file is the front end's. Ansible
    reaches the node through `python`, a wrapper that runs the interpreter, so every module,
    inside these namespaces; the worker's service starts in them too. systemd cannot run a
    unit in them, so the role installs the unit (luksctl_manage_service: false) and the test
    runs its ExecStart."""

    def __init__(self, index: int) -> None:
        super().__init__(index, token="")
        self.root = LAB_ROOT / self.name
        self.luks_dir = self.root / "luks"
        self.prefix = self.root / "opt-luksctl"  # its venv: about 40 MB of the guest's 2 GiB
        self.etc_changes = self.root / "etc"  # the overlay's upper directory
        self.python = self.root / "python"
        self.namespaces = {kind: LAB_ROOT / f"{self.name}.{kind}" for kind in ("mnt", "uts")}

    @property
    def fstab(self) -> Path:
        return self.etc_changes / "fstab"

    def create(self) -> None:
        user = pwd.getpwnam(self.unit.one("User"))
        self.add_to_network()
        self.luks_dir.mkdir(parents=True)  # root-owned 0755: luksctl refuses anything else
        self.luks_dir.chmod(0o755)
        self.prefix.mkdir(mode=0o755)
        self.etc_changes.mkdir()
        copy_files_mounted_in_etc(self.etc_changes)
        (self.root / "etc-work").mkdir()
        for path in self.namespaces.values():
            path.touch()
        run("unshare", f"--mount={self.namespaces['mnt']}", f"--uts={self.namespaces['uts']}", "--propagation",
            "private", "sh", "-c", NODE_BOOT, "node-boot", self.name, str(self.luks_dir), str(self.etc_changes),
            str(self.root / "etc-work"), str(user.pw_uid), str(user.pw_gid), str(self.prefix))
        self.python.write_text(f'#!/bin/sh\nexec {" ".join(self.enter_node())} /usr/bin/python3 "$@"\n')
        self.python.chmod(0o755)

    def enter_node(self) -> list[str]:
        return ["nsenter", f"--mount={self.namespaces['mnt']}", f"--uts={self.namespaces['uts']}",
                f"--net=/run/netns/{self.name}", "--"]

    def inventory_host(self) -> dict:
        return {**LOCAL_HOST, "ansible_python_interpreter": str(self.python), "luksctl_address": self.ip,
                "luksctl_manage_service": False}

    def destroy(self) -> None:
        self.kill()
        run(*self.enter_node(), "umount", "--lazy", str(NFS_MNT), check=False)
        for path in self.namespaces.values():  # the last reference: the namespace and its mounts go
            run("umount", str(path), check=False)
        self.remove_from_network()


@pytest.fixture
def cluster_network():
    """Bridge LAB_BRIDGE with the front end's FRONT_IP, and a RoleWorker on it, whose files
    live in a tmpfs at LAB_ROOT (an overlay's upper directory cannot be on the guest's overlays)."""
    run("modprobe", "bridge")
    LAB_ROOT.mkdir()
    run("mount", "-t", "tmpfs", "ansible-lab", str(LAB_ROOT))
    # A namespace can be kept open in a file only on a mount that does not propagate.
    run("mount", "--make-private", str(LAB_ROOT))
    exports_before = EXPORTS.read_text() if EXPORTS.exists() else None
    run("ip", "link", "add", LAB_BRIDGE, "type", "bridge")
    # One: each host adds its share of every task, 2,229 s for the first run with two workers
    # (make test, 2026-12-06). Two workers' tokens, bundle, exports and mounts are checked on
    # the host (tests/unit/test_ansible_role.py), the fan-out to several in tests/vm/cluster.
    workers = [RoleWorker(1)]
    try:
        run("ip", "addr", "add", f"{FRONT_IP}/24", "dev", LAB_BRIDGE)
        run("ip", "link", "set", LAB_BRIDGE, "up")
        for worker in workers:
            worker.create()
        yield workers
    finally:
        for worker in workers:
            worker.destroy()
        run("ip", "link", "del", LAB_BRIDGE, check=False)
        run("umount", "--lazy", str(LAB_ROOT), check=False)
        LAB_ROOT.rmdir()
        if exports_before is None:
            EXPORTS.unlink(missing_ok=True)
        else:
            EXPORTS.write_text(exports_before)
        # Without the role's export line, so that the volume can be unmounted.
        run("systemctl", "restart", "nfs-server.service")
        for path in (FRONT_TOKEN, CA_BUNDLE):
            path.unlink(missing_ok=True)


def test_a_cluster_from_a_blank_device_installed_encrypted_and_shared_then_the_dashboards_unlock_reaches_every_worker(
        operator_machine, systemd, bao_up, blank_device, cluster_network):
    """The role's one run from nothing: the front end installs as a single VM's would (its tasks
    are a single VM's plus the cluster's; a single VM's config.json is checked on the host). It
    costs over 30 minutes under emulation, so no second run follows here: the host runs the
    cluster and config tasks twice (tests/unit/test_ansible_role.py)."""
    playbook = operator_machine
    workers = cluster_network
    secret_path = f"cluster-sub/{secrets.token_hex(8)}/storage_encryption"
    inventory = {"all": {"children": {
        # A front end's setting, so a front end's variable: a worker's check-config refuses it.
        # Three remounts under software emulation take longer than the default minute.
        "luksctl_frontend": {"hosts": {"fe": {**LOCAL_HOST, "luksctl_address": FRONT_IP,
                                              "luksctl_api_extra_config": {"WN_READ_TIMEOUT": 180, "ALLOW_PLAIN_HTTP": True}}}},
        "luksctl_workers": {"hosts": {worker.name: worker.inventory_host() for worker in workers}}}}}
    extra_vars = {
        **role_vars(playbook, blank_device, bao_up, secret_path),
        "luksctl_infrastructure": "cluster",
        # fsid=0: the guest's root is 9p, and a plain export of a directory on it is refused.
        "luksctl_nfs_export_options": "rw,no_root_squash,fsid=0,no_subtree_check",
        "luksctl_nfs_mounts": [{"src": f"{FRONT_IP}:/", "path": str(NFS_MNT)}],
        "luksctl_nfs_mount_options": "rw,nofail,_netdev,soft,timeo=50",
    }

    wrapping_token = extra_vars["vault_wrapping_token"]

    first = playbook.run(inventory, extra_vars)

    assert all(host["failed"] == 0 and host["changed"] > 0 for host in first.values()), first
    # Installed as install.sh installs: a venv of our own on each node, the sudoers path linked to it.
    for prefix in (PREFIX, *(worker.prefix for worker in workers)):
        assert (prefix / "venv" / ".luksctl-installed-from").is_file(), prefix
        assert (prefix / "venv" / "bin" / "luksctl").is_file(), prefix
    assert os.readlink("/usr/local/sbin/luksctl") == str(PREFIX / "venv" / "bin" / "luksctl")
    assert_fastluks_on_roots_path(PREFIX)
    sudoers = Path("/etc/sudoers.d/luksctl-api")
    assert sudoers.read_bytes() == (REPO / "deploy" / "sudoers.d" / "luksctl-api").read_bytes()
    assert oct(sudoers.stat().st_mode & 0o777) == "0o440"
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
    config = json.loads(API_CONFIG.read_text())
    assert config == {"INFRASTRUCTURE_CONFIGURATION": "cluster", "VAULT_URL_ALLOWLIST": [bao_up.url],
                      "WN_IPS": [worker.ip for worker in workers], "WN_CA_BUNDLE": str(CA_BUNDLE),
                      "WN_READ_TIMEOUT": 180, "ALLOW_PLAIN_HTTP": True}
    # One token, made on the front end, the same on every worker, readable by its service only.
    token = FRONT_TOKEN.read_text()
    assert len(token.strip()) == 64
    assert CA_BUNDLE.read_text() == "".join(worker.cert.read_text() for worker in workers)
    export_line = f"{MOUNTPOINT} " + " ".join(
        f"{worker.ip}(rw,no_root_squash,fsid=0,no_subtree_check)" for worker in workers)
    assert export_line in EXPORTS.read_text().splitlines()
    for worker in workers:
        path = worker.luks_dir / "cluster-token"
        assert path.read_text() == token
        assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (0, 0o640)
        assert json.loads((worker.luks_dir / "config.json").read_text()) == {"NFS_MOUNTPOINT_LIST": [str(NFS_MNT)]}
        assert f"{FRONT_IP}:/ {NFS_MNT} nfs4 rw,nofail,_netdev,soft,timeo=50,nosuid,nodev 0 0" in worker.fstab.read_text().splitlines()
    assert f" {NFS_MNT} " not in FSTAB.read_text()  # the workers' fstab, not the front end's

    # The dashboard's unlock on the front end reaches the worker, verified by the bundle and
    # authenticated by the token, and each mounts the export from the fstab line the role wrote.
    for worker in workers:
        worker.spawn()
    for worker in workers:
        worker.wait_ready()
    dashboard = Dashboard("https://127.0.0.1:5000")
    wait_until(lambda: answers(dashboard), 120, UNIT)
    assert dashboard.status().state == "mounted"  # setup leaves it mounted
    systemd.systemctl("stop", "nfs-server.service")  # it holds the export: no close while it runs
    reply = unlock(dashboard, bao_up, blank_device, secret_path)  # the open restarts it
    assert reply == {"volume_state": "mounted", "nodes": {worker.ip: "mounted" for worker in workers}}
    assert all(worker.nfs_mounted() for worker in workers)
    assert token not in playbook.output() and wrapping_token not in playbook.output()
