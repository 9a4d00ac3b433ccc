"""A cluster inside one VM: the root network namespace is the front end, netns wnN are workers.

- Network: bridge LAB_BRIDGE in the root namespace with FRONT_IP/24, one veth pair per worker
  into netns wnN with 10.99.0.(10+N)/24. No other traffic.
- Front end: the kernel NFS server exports helpers_vm.MOUNTPOINT (/srv/export) with fsid=0.
- Worker N: ONE process tree started by a single `ip netns exec wnN ...` (every `ip netns exec`
  has its own mount namespace). The tree takes its own hostname (a UTS namespace: separate
  hosts have separate names, and the NFSv4 client identifies itself by it), bind-mounts its
  private directory over /etc/luks (config.json, cluster-token, certificate from
  `luksctl-api-wn gen-cert`), then execs EXACTLY the ExecStart of deploy/luksctl-api-wn.service
  as its User=/Group=. The NFS mount it makes (/srv/nfs-mnt) lives in its mount namespace only.
- FakeSystemctl stands in for systemd (the guest has none), NOT for the NFS server: for
  `restart nfs-kernel-server` it really restarts the kernel NFS server as Debian's unit does.

Everything runs as root in the virtme-ng guest. Used by tests/vm/cluster and scripts/bench_cluster.py.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/vm, for helpers_vm

from helpers_vm import (
    MOUNTPOINT,
    OUT,
    REPO,
    SERVICE_PATH,
    ServiceUnit,
    run,
    stop_process,
    tail,
    unverified_request,
    wait_until,
)
from support.proc import processes

SUBNET = "10.99.0"
FRONT_IP = f"{SUBNET}.1"
LAB_BRIDGE = "luksbr0"
LAB_DIR = Path("/srv/cluster-lab")
NFS_MNT = Path("/srv/nfs-mnt")
FSTAB = Path("/etc/fstab")
FSTAB_LINE = f"{FRONT_IP}:/ {NFS_MNT} nfs4 rw,nosuid,nodev,nofail,soft,timeo=50 0 0"  # README, Cluster deployment, step 3
EXPORTS_FILE = Path("/etc/exports.d/luksctl-cluster-test.exports")
EXPORT_LINE = f"{MOUNTPOINT} {SUBNET}.0/24(rw,no_root_squash,fsid=0,no_subtree_check)"
FRONT_TOKEN = Path("/etc/luks/cluster-token")
CA_BUNDLE = Path("/etc/luks/wn-ca-bundle.pem")
WORKER_PREFIX = "/luksctl_api_wn/v1.0"
WORKER_PORT = 5000
# NFSv4 lease/grace: the kernel's minimum. Every nfsd start opens a grace period during which
# clients cannot OPEN files (Debian's default is 90 s; see the report).
NFS_GRACE = 10

# Runs as root inside `ip netns exec wnN unshare --uts`: $1 hostname, $2 private /etc/luks,
# then the argv to exec (WITH_PROXY ... setpriv ... gunicorn ...).

def record_timing(name: str, value) -> None:
    with (OUT / "cluster-timings.jsonl").open("a") as out:
        out.write(json.dumps({name: value}) + "\n")


WORKER_BOOT = r"""
set -e
hostname "$1"
mount --bind "$2" /etc/luks
# The unit's RuntimeDirectory= (the remount lock), private to this node.
mkdir -p /run/luksctl-api-wn
mount -t tmpfs -o mode=0750,uid="$(id -u luksctl_api_wn)",gid="$(id -g luksctl_api_wn)" tmpfs /run/luksctl-api-wn
if [ ! -s /etc/luks/gunicorn-cert.pem ]; then
    # In root's environment, as an operator or install.sh runs it, not the service's.
    env -i PATH="$PATH" LANG=C.UTF-8 /opt/luksctl/venv/bin/luksctl-api-wn gen-cert --hostname "$1"
fi
shift 2
exec "$@"
"""

# Runs as root inside the node: the service's proxy, luksctl-proxy@luksctl-api-wn.service, as
# systemd would start it ($1 its RuntimeDirectory=, private to this node; $2 its ExecStartPre=
# lines; $3 its ExecStart=), in the background, then execs the argv of the service itself.
WITH_PROXY = r"""
set -e
mkdir -p "$1"
mount -t tmpfs -o mode=0755 tmpfs "$1"
eval "$2"
eval "$3" &
shift 3
exec "$@"
"""

SYSTEMCTL = Path("/usr/local/sbin/systemctl")
SYSTEMCTL_LOG = Path("/run/luksctl-test-systemctl.log")
# Replaces systemd, not the NFS server: nfs-kernel-server.service (nfs-server.service) on Debian
# stops with `rpc.nfsd 0; exportfs -au; exportfs -f` and starts with `exportfs -r; rpc.nfsd`.
# rpc.mountd (PartOf= the unit) keeps running here.
SYSTEMCTL_SCRIPT = f"""#!/bin/sh
# Test stand-in for systemctl (the VM has no systemd), installed by tests/vm/cluster.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "start $(date +%s.%N) $*" >> {SYSTEMCTL_LOG}
case "$*" in
"restart nfs-kernel-server"|"restart nfs-server")
    # The unit's ExecStartPre=-/usr/sbin/exportfs -r: a failure there is ignored.
    rpc.nfsd 0 && exportfs -au && exportfs -f && {{ exportfs -r || true; }} && rpc.nfsd -N 3 8
    rc=$?
    echo "end $(date +%s.%N) rc=$rc" >> {SYSTEMCTL_LOG}
    exit $rc ;;
*)
    echo "systemctl (test stand-in): only 'restart nfs-kernel-server' is supported, not: $*" >&2
    echo "end $(date +%s.%N) rc=1" >> {SYSTEMCTL_LOG}
    exit 1 ;;
esac
"""


def worker_ip(index: int) -> str:
    return f"{SUBNET}.{10 + index}"


class FakeSystemctl:
    def install(self) -> None:
        SYSTEMCTL.parent.mkdir(parents=True, exist_ok=True)
        assert not SYSTEMCTL.exists() or "tests/vm/cluster" in SYSTEMCTL.read_text(), f"{SYSTEMCTL} exists"
        SYSTEMCTL.write_text(SYSTEMCTL_SCRIPT)
        SYSTEMCTL.chmod(0o755)
        self.clear()

    def clear(self) -> None:
        SYSTEMCTL_LOG.write_text("")

    def calls(self) -> list[dict]:
        """[{"args": "restart nfs-kernel-server", "start": t0, "end": t1, "rc": 0}, ...]"""
        calls: list[dict] = []
        for line in SYSTEMCTL_LOG.read_text().splitlines():
            kind, stamp, rest = line.split(" ", 2) if line.count(" ") >= 2 else (*line.split(" ", 1), "")
            if kind == "start":
                calls.append({"args": rest, "start": float(stamp)})
            elif kind == "end" and calls:
                calls[-1].update(end=float(stamp), rc=int(rest.removeprefix("rc=")))
        return calls

    def remove(self) -> None:
        SYSTEMCTL.unlink(missing_ok=True)
        SYSTEMCTL_LOG.unlink(missing_ok=True)


class NfsServer:
    """The kernel NFSv4 server of the front end (root namespace), as TESTING-REAL.md sets it up."""

    def __init__(self) -> None:
        self.daemons: list[subprocess.Popen] = []
        self.running = False

    def setup(self) -> None:
        if not Path("/proc/fs/nfsd/threads").exists():
            run("mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd")
        run("rpc.nfsd", "0")  # the times can only be set while nfsd is down
        for name in ("nfsv4leasetime", "nfsv4gracetime"):
            Path(f"/proc/fs/nfsd/{name}").write_text(f"{NFS_GRACE}\n")
        EXPORTS_FILE.parent.mkdir(exist_ok=True)
        EXPORTS_FILE.write_text(EXPORT_LINE + "\n")
        MOUNTPOINT.mkdir(exist_ok=True)
        log = (OUT / "nfs-daemons.log").open("ab")
        # Foreground (-f/-F), so that we hold their pids and stop exactly them.
        self.daemons.append(subprocess.Popen(["rpcbind", "-f", "-w"], stdout=log, stderr=log))
        time.sleep(0.5)
        self.daemons.append(subprocess.Popen(["rpc.mountd", "-F", "-N", "2", "-N", "3"], stdout=log, stderr=log))
        self.start()

    def start(self) -> None:
        # Before the volume is mounted /srv/export is the guest's overlay, which cannot be
        # exported; Debian's unit ignores that failure too (ExecStartPre=-exportfs -r).
        run("exportfs", "-r", check=False)
        run("rpc.nfsd", "-N", "3", "8")
        self.running = True

    def stop(self) -> None:
        """As the unit's stop: no thread, nothing exported, so the volume can be unmounted."""
        run("rpc.nfsd", "0")
        run("exportfs", "-au")
        run("exportfs", "-f")
        self.running = False

    def teardown(self) -> None:
        self.stop()
        for daemon in reversed(self.daemons):
            stop_process(daemon, 30)
        self.daemons.clear()
        EXPORTS_FILE.unlink(missing_ok=True)


class WorkerNode:
    """One worker host: netns wnN, its private /etc/luks, its luksctl-api-wn service."""

    def __init__(self, index: int, token: str, gunicorn_workers: int | None = None) -> None:
        self.index = index
        self.name = f"wn{index}"
        self.ip = worker_ip(index)
        self.luks_dir = LAB_DIR / self.name / "luks"
        self.token = token
        self.unit = ServiceUnit(REPO / "deploy" / "luksctl-api-wn.service")
        self.proxy_unit = ServiceUnit(REPO / "deploy" / "luksctl-proxy@.service", instance="luksctl-api-wn")
        # None: the unit's ExecStart exactly. The benchmark may lower it to fit 16 nodes in RAM.
        self.gunicorn_workers = gunicorn_workers
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log = OUT / f"{self.name}.log"

    # --- host set-up -------------------------------------------------------------------------
    def add_to_network(self) -> None:
        veth = f"v{self.name}"
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        run("ip", "link", "set", veth, "master", LAB_BRIDGE, "up")
        run("ip", "-n", self.name, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        run("ip", "-n", self.name, "link", "set", "eth0", "up")
        run("ip", "-n", self.name, "link", "set", "lo", "up")

    def remove_from_network(self) -> None:
        run("ip", "link", "del", f"v{self.name}", check=False)
        run("ip", "netns", "del", self.name, check=False)

    def write_files(self, config: dict | None = None) -> None:
        # root-owned and not group/other-writable: `luksctl nfs-mount` refuses anything else.
        self.luks_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.luks_dir, 0, 0)
        self.luks_dir.chmod(0o755)
        config_file = self.luks_dir / "config.json"
        config_file.write_text(json.dumps(config or {"NFS_MOUNTPOINT_LIST": [str(NFS_MNT)]}))
        os.chown(config_file, 0, 0)
        config_file.chmod(0o644)
        self.write_token(self.token)

    def write_token(self, token: str) -> None:
        """root:luksctl_api_wn 0640, as README "Cluster deployment" step 4 says. Read at start."""
        self.token = token
        path = self.luks_dir / "cluster-token"
        path.write_text(token + "\n")
        os.chown(path, 0, grp.getgrnam(self.unit.one("Group")).gr_gid)
        path.chmod(0o640)

    @property
    def cert(self) -> Path:
        return self.luks_dir / "gunicorn-cert.pem"

    # --- the service -------------------------------------------------------------------------
    def exec_start(self) -> list[str]:
        argv = self.unit.exec_start
        if self.gunicorn_workers is not None:
            position = argv.index("--workers")
            argv[position + 1] = str(self.gunicorn_workers)
        return argv

    def enter_node(self) -> list[str]:
        """The argv prefix that puts the service's process tree in this node (see WORKER_BOOT)."""
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c", WORKER_BOOT, "wn-boot",
                self.name, str(self.luks_dir)]

    def with_proxy(self) -> list[str]:
        proxy = self.proxy_unit
        # The proxy unit's own environment, not the service's this script inherits (systemd gives
        # each unit its own): the service's PROMETHEUS_MULTIPROC_DIR, say, is not the proxy's.
        env = ["env", "-i", f"PATH={SERVICE_PATH}", "LANG=C.UTF-8", *(f"{k}={v}" for k, v in proxy.environment.items())]
        return ["sh", "-c", WITH_PROXY, "with-proxy", f"/run/{proxy.one('RuntimeDirectory')}",
                " && ".join(shlex.join([*env, *argv]) for argv in proxy.exec_start_pre),
                shlex.join([*env, *shlex.split(proxy.one("ExecStart"))])]

    def spawn(self) -> None:
        """Starts the process tree; wait_ready() waits for it to answer."""
        user = pwd.getpwnam(self.unit.one("User"))
        group = grp.getgrnam(self.unit.one("Group"))
        service = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={group.gr_gid}", "--init-groups", "--",
                   *self.exec_start()]
        argv = [*self.enter_node(), *self.with_proxy(), *service]
        env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": user.pw_dir, "USER": user.pw_name,
               "LOGNAME": user.pw_name, "SHELL": user.pw_shell, **self.unit.environment}
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"==== start {self.starts} ====\n".encode())
            log.flush()
            # Its own session: kill() signals the whole tree (gunicorn workers, sudo, mount).
            self.proc = subprocess.Popen(argv, env=env, cwd="/", stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 480) -> None:  # a loaded 2-core host needed >240 s for 3
        wait_until(self._answers, timeout, f"luksctl-api-wn on {self.ip} (log {self.log})", interval=1)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: exited {self.proc.returncode}:\n{tail(self.log)}")
        try:
            # 502: the proxy is up, gunicorn's socket not yet.
            return unverified_request("GET", self.url("status"), timeout=10).status_code != 502
        except requests.RequestException:
            return False

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The gunicorn master: `ip netns exec`, unshare, sh and setpriv all exec in place."""
        return self.proc.pid

    def kill(self) -> None:
        """The node's service dies at once, every process of it (a crash, or the node going down)."""
        if self.proc is None:
            return
        group = self.proc.pid
        try:
            os.killpg(group, signal.SIGCONT)
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(60)
        self.proc = None
        # Workers of a killed master linger for a moment; they hold the port.
        wait_until(lambda: not _group_alive(group), 30, f"{self.name}: processes to exit")

    def freeze(self) -> None:
        """A hung node: the kernel still completes TCP handshakes, nobody answers."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def restart(self) -> None:
        self.kill()
        self.start()

    # --- inside the node ---------------------------------------------------------------------
    def in_node(self, *argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Runs argv in the node's mount and network namespaces (those of its gunicorn)."""
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-n", "-u", *argv],
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {argv} exited {result.returncode}: {result.stderr.decode(errors='replace')}")
        return result

    def nfs_mounted(self) -> bool:
        """Read from outside: /proc/PID/mountinfo is the mount table of the node's namespace."""
        for line in Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fields[4] == str(NFS_MNT) and fstype.startswith("nfs"):
                return True
        return False

    def umount_nfs(self) -> None:
        if self.running and self.nfs_mounted():
            self.in_node("umount", "-f", "-l", str(NFS_MNT))

    # --- its API -----------------------------------------------------------------------------
    def url(self, endpoint: str) -> str:
        return f"https://{self.ip}:{WORKER_PORT}{WORKER_PREFIX}/{endpoint}"

    def status(self) -> requests.Response:
        return requests.get(self.url("status"), verify=str(self.cert), timeout=60)

    def nfs_mount(self, headers: dict | None = None) -> requests.Response:
        return requests.post(self.url("nfs-mount"), headers=headers or {}, verify=str(self.cert), timeout=120)


def _group_alive(group: int) -> bool:
    """Any live (not zombie) process left in the process group?"""
    return any(process.pgrp == group and process.state != "Z" for process in processes().values())


class Lab:
    """N worker hosts plus the front end's network, NFS server, token and CA bundle."""

    def __init__(self, size: int, gunicorn_workers: int | None = None) -> None:
        self.token = secrets.token_urlsafe(32)
        self.workers = [WorkerNode(i, self.token, gunicorn_workers) for i in range(1, size + 1)]
        self.nfs = NfsServer()
        self.systemctl = FakeSystemctl()
        self._fstab_before: str | None = None
        self._done: list = []  # teardown steps, in set-up order

    @property
    def ips(self) -> list[str]:
        return [worker.ip for worker in self.workers]

    def setup(self) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        run("modprobe", "-a", "bridge", "veth", "nfsd", "nfs", "nfsv4")
        run("ip", "link", "add", LAB_BRIDGE, "type", "bridge")
        self._done.append(lambda: run("ip", "link", "del", LAB_BRIDGE, check=False))
        run("ip", "addr", "add", f"{FRONT_IP}/24", "dev", LAB_BRIDGE)
        run("ip", "link", "set", LAB_BRIDGE, "up")
        for worker in self.workers:
            self._done.append(worker.remove_from_network)
            worker.add_to_network()

        NFS_MNT.mkdir(exist_ok=True)
        self._fstab_before = FSTAB.read_text() if FSTAB.exists() else ""
        self._done.append(self._restore_fstab)
        FSTAB.write_text(self._fstab_before.rstrip("\n") + "\n" + FSTAB_LINE + "\n")

        self._done.append(self.systemctl.remove)
        self.systemctl.install()
        self._done.append(self.nfs.teardown)
        self.nfs.setup()

        # The front end's copy of the token: root:luksctl_api 0640.
        FRONT_TOKEN.write_text(self.token + "\n")
        os.chown(FRONT_TOKEN, 0, grp.getgrnam("luksctl_api").gr_gid)
        FRONT_TOKEN.chmod(0o640)
        self._done.append(lambda: FRONT_TOKEN.unlink(missing_ok=True))

        for worker in self.workers:
            worker.write_files()
        self._done.append(self.stop_workers)
        self._done.append(lambda: CA_BUNDLE.unlink(missing_ok=True))
        self.start_workers(self.workers)

    def restart_stale_workers(self) -> None:
        """Every worker running with the lab's token: a test may have killed one or changed its token."""
        stale = [worker for worker in self.workers if not worker.running or worker.token != self.token]
        for worker in stale:
            worker.kill()
            worker.write_token(self.token)
        if stale:
            self.start_workers(stale)

    def start_workers(self, workers: list[WorkerNode]) -> None:
        """In parallel: under software emulation each start costs many CPU-seconds."""
        for worker in workers:
            worker.spawn()
        with ThreadPoolExecutor(max_workers=len(workers) or 1) as pool:
            list(pool.map(lambda worker: worker.wait_ready(), workers))
        self.write_ca_bundle()

    def write_ca_bundle(self) -> None:
        """README "Cluster deployment" step 5: the workers' certificates, concatenated."""
        CA_BUNDLE.write_text("".join(worker.cert.read_text() for worker in self.workers if worker.cert.exists()))
        CA_BUNDLE.chmod(0o644)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.umount_nfs()
            worker.kill()

    def frontend_config(self, **overrides) -> dict:
        return {
            "INFRASTRUCTURE_CONFIGURATION": "cluster",
            "WN_IPS": self.ips,
            "WN_CA_BUNDLE": str(CA_BUNDLE),
            "CLUSTER_TOKEN_FILE": str(FRONT_TOKEN),
            "FAILED_OPEN_LIMIT": 0,
            **overrides,
        }

    def unmount_workers(self) -> None:
        for worker in self.workers:
            worker.umount_nfs()

    def _restore_fstab(self) -> None:
        if self._fstab_before is not None:
            FSTAB.write_text(self._fstab_before)

    def teardown(self) -> None:
        errors = []
        for step in reversed(self._done):
            try:
                step()
            except Exception as exc:  # tear down as much as possible, then report
                errors.append(f"{step}: {exc}")
        self._done.clear()
        if errors:
            raise RuntimeError("lab teardown: " + "; ".join(errors))
