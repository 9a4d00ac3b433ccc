"""The pieces the VM fixtures are made of: a real OpenBao, real LUKS volumes, the real service.

Everything here runs as root inside the virtme-ng guest (scripts/vm-run.sh). Process start-up
is slow under software emulation, so these helpers talk HTTP where they can instead of
spawning CLIs, and start long-lived processes once.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shlex
import signal
import socket
import sqlite3
import string
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import requests
import urllib3

# tests/, for the helpers host and VM tests share (pytest puts it there; the VM scripts do not).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import bao as support_bao  # noqa: E402
from support import raw_http  # noqa: E402
from support.secret_file import write_secret_file  # noqa: E402
from support.shim import SHIM_DIR, install_shim, remove_shim  # noqa: E402
from support.waiting import wait_until  # noqa: E402

# Our service presents a self-signed certificate, exactly as in production. (Under pytest the
# filter set here is undone after collection; conftest.py sets it again for the tests.)
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

REPO = Path(__file__).resolve().parents[2]
# Start-up bound for OpenBao and gunicorn: ~20 s on an idle host, but several VMs sharing
# two cores under software emulation were measured past 90 s.
START_TIMEOUT = 300
PREFIX = Path("/opt/luksctl")  # guest.sh links it to the VM prefix
VENV_BIN = PREFIX / "venv" / "bin"
OUT = Path(os.environ.get("LUKSCTL_VM_OUT", "/tmp/vm-out"))
LUKS_DIR = Path("/etc/luks")
VOLUME_INI = LUKS_DIR / "luks-cryptdev.ini"
API_CONFIG = LUKS_DIR / "config.json"
HEADER_BACKUP = LUKS_DIR / "luks-header.bck"
API_PORT = 5000
FAILED_OPENS_DB = Path("/run/luksctl-api/failed-opens.sqlite")  # in the unit's RuntimeDirectory=
# Not /export: the guest's root is the host's, read-only, so a new top-level directory is impossible.
MOUNTPOINT = Path("/srv/export")
# The real binary: the harness's own calls must not show up in CryptsetupCounter's count.
CRYPTSETUP = "/sbin/cryptsetup"
# What a systemd service gets, so the service sees no trace of the test's environment.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(*argv: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command as root and fails the test with its stderr when it fails."""
    result = subprocess.run(argv, input=input, capture_output=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}: {result.stderr.decode(errors='replace')}")
    return result


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


class Bao(support_bao.Bao):
    """The session's OpenBao in the guest: the prefix's binary, HOME=/tmp (/root is read-only in
    the guest), its log kept across restarts, and the slow start-up of an emulated machine.
    storage, port: support.bao.Bao's (a server whose data outlives the boot)."""

    def __init__(self, log: Path, *, storage: Path | None = None, port: int | None = None) -> None:
        super().__init__(Path("/tmp"), log=log, binary=VENV_BIN / "bao", start_timeout=START_TIMEOUT, storage=storage, port=port)


@dataclass
class Volume:
    passphrase: bytes
    image: Path
    loop: str
    uuid: str
    cryptdev: str

    @property
    def mapper(self) -> str:
        return f"/dev/mapper/{self.cryptdev}"

    @property
    def by_uuid(self) -> Path:
        return Path("/dev/disk/by-uuid") / self.uuid

    def link_by_uuid(self) -> None:
        """No udev in the guest: make the link it would make for this header."""
        self.by_uuid.parent.mkdir(parents=True, exist_ok=True)
        self.by_uuid.unlink(missing_ok=True)
        self.by_uuid.symlink_to(Path("../..") / Path(self.loop).name)

    def write_ini(self) -> None:
        """Describes this volume in /etc/luks/luks-cryptdev.ini, as fast-luks does."""
        VOLUME_INI.write_text(
            "[luks]\n"
            "cipher_algorithm = aes-xts-plain64\n"
            "hash_algorithm = sha256\n"
            "keysize = 256\n"
            f"device = {self.loop}\n"
            f"uuid = {self.uuid}\n"
            f"cryptdev = {self.cryptdev}\n"
            f"mapper = {self.mapper}\n"
            f"mountpoint = {MOUNTPOINT}\n"
            "filesystem = ext4\n"
            f"header_path = {HEADER_BACKUP}\n"
        )
        VOLUME_INI.chmod(0o644)


@dataclass
class VolumeFactory:
    """Makes file-backed LUKS2 volumes on loop devices; cleanup() undoes all of it."""

    workdir: Path = Path("/srv/luks-test")
    volumes: list[Volume] = field(default_factory=list)

    def __call__(self, passphrase: str | bytes = "correct horse battery staple", *, test_kdf: bool = True) -> Volume:
        """Formats with exactly these bytes on stdin (no newline added) and makes it current.

        test_kdf=False keeps cryptsetup's default PBKDF (argon2id, ~2 s), as production volumes do."""
        secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
        self.workdir.mkdir(parents=True, exist_ok=True)
        cryptdev = "".join(secrets.choice(string.ascii_lowercase) for _ in range(8))  # fast-luks style name
        # Named after the cryptdev: two factories alive at once (a module's and a test's) must
        # never truncate each other's attached image.
        image = self.workdir / f"volume{len(self.volumes)}-{cryptdev}.img"
        with image.open("xb") as f:
            f.truncate(64 * 1024 * 1024)
        loop = run("losetup", "--find", "--show", str(image)).stdout.decode().strip()
        # Register before formatting so cleanup() detaches the loop device even if a step fails.
        volume = Volume(secret, image, loop, uuid="", cryptdev=cryptdev)
        self.volumes.append(volume)
        # Fast PBKDF for tests only; production keeps cryptsetup's defaults (argon2id).
        kdf = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"] if test_kdf else []
        run(CRYPTSETUP, "luksFormat", "--type", "luks2", *kdf, "--batch-mode", "--key-file=-", loop, input=secret)
        volume.uuid = run(CRYPTSETUP, "luksUUID", loop).stdout.decode().strip()
        run(CRYPTSETUP, "open", "--key-file=-", loop, volume.cryptdev, input=secret)
        run("mkfs.ext4", "-q", volume.mapper)
        run(CRYPTSETUP, "close", volume.cryptdev)
        volume.link_by_uuid()
        HEADER_BACKUP.unlink(missing_ok=True)  # cryptsetup refuses to overwrite a backup
        run(CRYPTSETUP, "luksHeaderBackup", loop, "--header-backup-file", str(HEADER_BACKUP))
        volume.write_ini()
        MOUNTPOINT.mkdir(exist_ok=True)
        return volume

    def cleanup(self) -> None:
        """Leaves the guest as before: unmounted, closed, detached, no config naming a volume."""
        if os.path.ismount(MOUNTPOINT):
            run("umount", str(MOUNTPOINT))
        for volume in self.volumes:
            if Path(volume.mapper).exists():
                run(CRYPTSETUP, "close", volume.cryptdev)
            if volume.uuid:
                volume.by_uuid.unlink(missing_ok=True)
            run("losetup", "--detach", volume.loop, check=False)
            volume.image.unlink(missing_ok=True)
        for path in (VOLUME_INI, HEADER_BACKUP):
            path.unlink(missing_ok=True)
        self.volumes.clear()


def luks_metadata(volume: Volume) -> dict:
    return json.loads(run(CRYPTSETUP, "luksDump", "--dump-json-metadata", volume.loop).stdout)


def volume_key_digest(volume: Volume) -> str:
    return next(digest["digest"] for digest in luks_metadata(volume)["digests"].values() if "0" in digest["segments"])


def reencrypting(volume: Volume) -> bool:
    """A re-encryption started and not finished: cryptsetup's requirement in the header."""
    return any(requirement.startswith("online-reencrypt")
               for requirement in luks_metadata(volume)["config"].get("requirements", {}).get("mandatory", []))


def opens(device: str, passphrase: str | bytes) -> bool:
    """cryptsetup's answer: 0 opens, 2 a wrong passphrase; anything else fails the test."""
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    result = run(CRYPTSETUP, "open", "--test-passphrase", "--key-file=-", device, input=secret, check=False)
    assert result.returncode in (0, 2), f"cryptsetup open --test-passphrase {device} exited {result.returncode}: {result.stderr!r}"
    return result.returncode == 0


def stored(bao, secret_path: str, version: int | None = None) -> str:
    """The passphrase at `secret_path` (KV v2, as the dashboard stores it): the latest, or `version`."""
    query = f"?version={version}" if version else ""
    return bao.request("GET", f"secrets/data/{secret_path}{query}").json()["data"]["data"][support_bao.SECRET_KEY]


def token_file(bao, policy: str) -> str:
    """A plain token with `policy`, in a root-only file: luksctl never takes one in argv."""
    token = bao.request("POST", "auth/token/create", json={"policies": [policy], "ttl": "1h"}).json()["auth"]["client_token"]
    return write_secret_file(Path("/run") / f"luksctl-test-token-{policy}", token)


def mapped(name: str) -> bool:
    """Whether device-mapper has a device of that name (from sysfs: no process)."""
    return _dm_sysfs(name) is not None


def suspended(name: str) -> bool:
    """Whether that device-mapper device holds its I/O (cryptsetup's hotzone, mid-way)."""
    directory = _dm_sysfs(name)
    try:
        return directory is not None and (directory / "suspended").read_text().strip() == "1"
    except OSError:
        return False


def _dm_sysfs(name: str) -> Path | None:
    for path in Path("/sys/block").glob("dm-*/dm/name"):
        try:
            if path.read_text().strip() == name:
                return path.parent
        except OSError:  # removed while we read it
            continue
    return None


def kernel_state(volume: Volume) -> tuple[str, bool]:
    """("mounted" | "unmounted", mapper active) from /sys/block/dm-*/dm/name and mountinfo."""
    device = None
    for name in Path("/sys/block").glob("dm-*/dm/name"):
        try:
            if name.read_text().strip() == volume.cryptdev:
                device = (name.parent.parent / "dev").read_text().strip()
        except FileNotFoundError:
            continue
    mounted = False
    if device is not None:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" ")
            if fields[2] == device and fields[4] == str(MOUNTPOINT):
                mounted = True
    return ("mounted" if mounted else "unmounted"), device is not None


def clear_failed_opens() -> None:
    """Empties the API's failed-open counter (per client address, shared by the workers)."""
    if FAILED_OPENS_DB.exists():
        with sqlite3.connect(FAILED_OPENS_DB, timeout=10) as db:
            db.execute("DELETE FROM failures")
        db.close()


def put_back_closed(volume: Volume) -> None:
    """Unmounted and closed, done as root without the product."""
    if os.path.ismount(MOUNTPOINT):
        run("umount", str(MOUNTPOINT))
    if Path(volume.mapper).exists():
        run(CRYPTSETUP, "close", volume.cryptdev)


class ServiceUnit:
    """The [Service] settings of a systemd unit that the tests honour, so they run what
    operators run: User=, Group=, RuntimeDirectory=, RuntimeDirectoryMode=, Environment=,
    ExecStart=."""

    def __init__(self, path: Path, instance: str | None = None) -> None:
        """instance: for a template unit (name@.service), what %i stands for."""
        self.path = path
        self.settings: dict[str, list[str]] = {}
        section = ""
        text = path.read_text()
        if instance is not None:
            text = text.replace("%i", instance)
        for line in text.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
                key, value = line.split("=", 1)
                self.settings.setdefault(key.strip(), []).append(value.strip())

    def one(self, key: str, default: str | None = None) -> str:
        values = self.settings.get(key, [default] if default is not None else [])
        assert len(values) == 1, f"{self.path}: expected one {key}=, found {values}"
        return values[0]

    @property
    def exec_start(self) -> list[str]:
        return shlex.split(self.one("ExecStart"))

    @property
    def exec_start_pre(self) -> list[list[str]]:
        return [shlex.split(line) for line in self.settings.get("ExecStartPre", [])]

    @property
    def environment(self) -> dict[str, str]:
        pairs = [item.split("=", 1) for value in self.settings.get("Environment", []) for item in shlex.split(value)]
        return dict(pairs)


class Proxy:
    """luksctl-proxy@SERVICE.service as systemd would run it: its RuntimeDirectory=, each
    ExecStartPre= (the configuration from config.json, `nginx -t`), then ExecStart=, as root."""

    def __init__(self, service: str) -> None:
        self.unit = ServiceUnit(REPO / "deploy" / "luksctl-proxy@.service", instance=service)
        self.proc: subprocess.Popen | None = None
        self.log = OUT / f"proxy-{service}.log"

    def start(self) -> None:
        runtime = Path("/run") / self.unit.one("RuntimeDirectory")
        runtime.mkdir(exist_ok=True)
        runtime.chmod(int(self.unit.one("RuntimeDirectoryMode"), 8))
        env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", **self.unit.environment}
        for argv in self.unit.exec_start_pre:
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=START_TIMEOUT)
            assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(shlex.split(self.unit.one("ExecStart")), env=env, cwd="/", stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, 60)
        self.proc = None


class Api:
    """The front-end API started as deploy/luksctl-api.service would start it, behind its proxy
    (luksctl-proxy@luksctl-api.service), which serves port 5000."""

    base_url = f"https://127.0.0.1:{API_PORT}"

    def __init__(self) -> None:
        self.unit = ServiceUnit(REPO / "deploy" / "luksctl-api.service")
        self.proxy = Proxy("luksctl-api")
        self.proc: subprocess.Popen | None = None
        self.config: dict | None = None
        self.env: dict[str, str] = {}
        self.starts = 0
        self.stdout_log = self.stderr_log = Path()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, config: dict | None = None, env: dict[str, str] | None = None) -> None:
        """env: added to what systemd would give the service (e.g. a hostile VAULT_TOKEN)."""
        self.config = config or {"INFRASTRUCTURE_CONFIGURATION": "single_vm"}
        self.env = env or {}
        API_CONFIG.write_text(json.dumps(self.config))
        API_CONFIG.chmod(0o644)
        user = pwd.getpwnam(self.unit.one("User"))
        group = grp.getgrnam(self.unit.one("Group", user.pw_name))
        if not (LUKS_DIR / "gunicorn-key.pem").exists():
            run(str(VENV_BIN / "luksctl-api"), "gen-cert")
        # What systemd makes for RuntimeDirectory= (the open lock lives there).
        runtime = Path("/run") / self.unit.one("RuntimeDirectory")
        runtime.mkdir(exist_ok=True)
        os.chown(runtime, user.pw_uid, group.gr_gid)
        runtime.chmod(int(self.unit.one("RuntimeDirectoryMode", "0755"), 8))

        self.starts += 1
        OUT.mkdir(parents=True, exist_ok=True)
        self.stdout_log = OUT / f"api.{self.starts}.stdout.log"
        self.stderr_log = OUT / f"api.{self.starts}.stderr.log"
        # setpriv execs in place (runuser would fork), so self.pid is gunicorn's master.
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={group.gr_gid}", "--init-groups", "--",
                *self.unit.exec_start]
        env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": user.pw_dir, "USER": user.pw_name,
               "LOGNAME": user.pw_name, "SHELL": user.pw_shell, **self.unit.environment, **self.env}
        with self.stdout_log.open("wb") as out, self.stderr_log.open("wb") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd="/", stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        try:
            self.proxy.start()
            wait_until(self._answers, START_TIMEOUT, f"luksctl-api at {self.base_url}")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{tail(self.stderr_log)}")
        if self.proxy.proc.poll() is not None:
            raise RuntimeError(f"the proxy exited {self.proxy.proc.returncode}:\n{tail(self.proxy.log)}")
        try:
            # 502: the proxy is up, gunicorn's socket not yet.
            return unverified_request("GET", f"{self.base_url}/luksctl_api/v1.0/status", timeout=5).status_code != 502
        except requests.RequestException:  # refused, or workers still importing
            return False

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Signals the gunicorn master, e.g. SIGKILL for a crash or SIGHUP for a reload (not the proxy)."""
        os.kill(self.pid, sig)

    def stop(self) -> None:
        """Both, as `systemctl stop luksctl-api` does (the proxy is PartOf= it). A SIGKILLed
        master's workers may finish their requests meanwhile: the next gunicorn binds a new
        socket at the same path, and the proxy connects to that one."""
        self.proxy.stop()
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, 60)
        self.proc = None
        wait_until(self._port_free, 90, f"port {API_PORT} to be released")

    @staticmethod
    def _port_free() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", API_PORT)) != 0

    def restart(self, config: dict | None = None, env: dict[str, str] | None = None) -> None:
        self.stop()
        self.start(config, env)

    def ensure(self, config: dict, env: dict[str, str] | None = None) -> None:
        """Running with exactly this config and env: starts, or restarts, only when needed
        (restarts cost seconds). A master that died (e.g. SIGKILLed by a test) counts as not running."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop()  # a dead master's workers may still hold the port for a moment
            self.start(config, env)
        elif (self.config, self.env) != (config, env or {}):
            self.restart(config, env)


def single_vm_config(bao: Bao, **settings) -> dict:
    """The front end's config.json for a single VM whose open may contact this OpenBao (plain http://)."""
    return {"INFRASTRUCTURE_CONFIGURATION": "single_vm", "VAULT_URL_ALLOWLIST": [bao.url], "ALLOW_PLAIN_HTTP": True, **settings}


@contextlib.contextmanager
def single_vm_stack() -> Iterator[tuple[VolumeFactory, Bao, Api]]:
    """For scripts (demo, benchmarks): volumes, OpenBao and the API, all stopped and cleaned
    up on the way out, whatever happened."""
    OUT.mkdir(parents=True, exist_ok=True)
    volumes, bao, api = VolumeFactory(), Bao(OUT / "bao.log"), Api()
    try:
        yield volumes, bao, api
    finally:
        api.stop()
        bao.stop()
        volumes.cleanup()


class Reply(NamedTuple):
    state: str
    response: requests.Response


class _UnverifiedTLSAdapter(requests.adapters.HTTPAdapter):
    """requests' verify=False makes an SSL context for each connection and loads the system's CA
    bundle into it after the TCP connect, with the GIL held: 65 ms natively, seconds on the
    emulated guest. Ten such threads queued behind one another past nginx's 10 s handshake
    deadline (SSLZeroReturnError in test_ten_concurrent_opens_run_cryptsetup_once). This
    adapter gives every connection one context made once, with nothing to load."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, ssl_context=raw_http.TLS, **kwargs)


def unverified_session() -> requests.Session:
    """A session whose https:// connections share one prebuilt context; each call still passes verify=False."""
    session = requests.Session()
    session.mount("https://", _UnverifiedTLSAdapter())
    return session


def unverified_request(method: str, url: str, **kwargs) -> requests.Response:
    """requests.request(method, url, verify=False, ...): a new connection, no certificate checked."""
    with unverified_session() as session:
        return session.request(method, url, verify=False, **kwargs)


class Dashboard:
    """Calls the API exactly as the dashboard does (PROTOCOL §3), and parses the same way.

    One difference: a timeout. The dashboard sets none; here a hang becomes a failure
    instead of a stuck CI job.
    """

    timeout = 120

    def __init__(self, base_url: str, *, keep_alive: bool = False) -> None:
        self.base_url = base_url
        # Without keep_alive, the dashboard's way: a new connection for every call.
        self.session = unverified_session() if keep_alive else None

    def status(self) -> Reply:
        r = self._call("GET", "status")
        return Reply(json.loads(r.text)["volume_state"], r)

    def open(self, payload: dict) -> Reply:
        r = self._call("POST", "open", json=payload)
        return Reply(json.loads(r.text)["volume_state"], r)

    def _call(self, method: str, endpoint: str, **kwargs) -> requests.Response:
        url = f"{self.base_url}/luksctl_api/v1.0/{endpoint}"
        if self.session is not None:
            return self.session.request(method, url, verify=False, timeout=self.timeout, **kwargs)
        return unverified_request(method, url, timeout=self.timeout, **kwargs)


class CryptsetupCounter:
    """Counts real cryptsetup runs: luksctl resolves binaries on a fixed PATH that puts
    /usr/local/sbin first, so a wrapper there sees every call."""

    wrapper = SHIM_DIR / "cryptsetup"
    counter = Path("/run/cryptsetup-calls")

    def install(self) -> None:
        self.counter.write_text("")
        # flock: concurrent opens must not lose a line. exec keeps stdin (the passphrase) intact.
        install_shim(
            "cryptsetup",
            f"flock {self.counter} sh -c 'echo \"$*\" >> {self.counter}' -- \"$@\" </dev/null\n"
            f'exec {CRYPTSETUP} "$@"\n'
        )

    def calls(self) -> list[str]:
        """The arguments of each call so far, one string per call (no secrets: they go on stdin)."""
        return self.counter.read_text().splitlines()

    def remove(self) -> None:
        remove_shim("cryptsetup")
        self.counter.unlink(missing_ok=True)


def assert_fastluks_on_roots_path(prefix: Path) -> None:
    """Deployments call `fastluks` by name, as they called pyluks': root's plain PATH finds ours."""
    assert os.readlink("/usr/local/sbin/fastluks") == str(prefix / "venv" / "bin" / "fastluks")
    result = subprocess.run(["fastluks", "--help"], env={"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": "/root"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--device" in result.stdout and "--vault-url" in result.stdout
