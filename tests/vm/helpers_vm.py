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
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import requests
import urllib3

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
# Not /export: the guest's root is the host's, read-only, so a new top-level directory is impossible.
MOUNTPOINT = Path("/srv/export")
READ_POLICY = "luksctl-read"
WRITE_POLICY = "write_only"
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    """Polls with a bound: under TCG start-up takes many seconds, but never forever."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout} s")
        time.sleep(interval)


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


class Bao:
    """A real OpenBao dev server laid out like the dashboard's Vault (PROTOCOL §3)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()  # kept across stop()/start(), so clients' vault_url stays valid
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [str(VENV_BIN / "bao"), "server", "-dev", "-dev-root-token-id=root",
                f"-dev-listen-address=127.0.0.1:{self.port}"]
        # HOME: /root is read-only in the guest and the dev server writes ~/.vault-token.
        env = {"PATH": SERVICE_PATH, "HOME": "/tmp"}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._healthy, START_TIMEOUT, f"OpenBao on {self.url} (log {self.log})")
        except BaseException:
            self.stop()  # a session fixture that failed must not leave its server behind
            raise
        # The dev server keeps everything in memory: lay it out again after every start.
        self.request("POST", "sys/mounts/secrets", json={"type": "kv", "options": {"version": "2"}})
        self.request("PUT", f"sys/policies/acl/{READ_POLICY}",
                     json={"policy": 'path "secrets/data/*" { capabilities = ["read"] }'})
        # The dashboard's deployment-time policy (PROTOCOL §7): create only, no read, no update.
        self.request("PUT", f"sys/policies/acl/{WRITE_POLICY}",
                     json={"policy": 'path "secrets/data/*" { capabilities = ["create"] }'})

    def stop(self) -> None:
        """Vault down: connections to its URL are refused. Its stored secrets are lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"OpenBao exited {self.proc.returncode}:\n{tail(self.log)}")
        try:
            return requests.get(f"{self.url}/v1/sys/health", timeout=5).status_code == 200
        except requests.RequestException:  # refused, or still unsealing (reads time out)
            return False

    def request(self, method: str, path: str, token: str = "root", headers: dict | None = None,
                **kwargs) -> requests.Response:
        response = requests.request(method, f"{self.url}/v1/{path}", timeout=30,
                                    headers={"X-Vault-Token": token, **(headers or {})}, **kwargs)
        response.raise_for_status()
        return response

    def store_passphrase(self, sub: str, uuid: str, passphrase: str) -> str:
        """Stores it where the dashboard does; returns the secret_path for an open request."""
        secret_path = f"{sub}/{uuid}/storage_encryption"
        self.request("POST", f"secrets/data/{secret_path}",
                     json={"data": {"storage_encryption_key": passphrase}})
        return secret_path

    def wrap_token(self, ttl: str = "300s", token_id: str | None = None) -> str:
        """A single-use wrapping token around a read-only token, as the dashboard makes it.

        token_id: the wrapped (unwrapped-to-be) token's own id, chosen by the test (root may),
        e.g. to look for it in logs later.
        """
        body: dict = {"policies": [READ_POLICY]}
        if token_id is not None:
            body["id"] = token_id
        response = self.request("POST", "auth/token/create", headers={"X-Vault-Wrap-TTL": ttl}, json=body)
        return response.json()["wrap_info"]["token"]

    def write_only_wrapping_token(self, token_id: str | None = None) -> str:
        """What the dashboard hands a VM at deployment time for `setup` (PROTOCOL §7).

        token_id: as for wrap_token, to look for the unwrapped token afterwards.
        """
        body: dict = {"policies": [WRITE_POLICY], "ttl": "12h", "period": "12h"}
        if token_id is not None:
            body["id"] = token_id
        response = self.request("POST", "auth/token/create", headers={"X-Vault-Wrap-TTL": "1h"}, json=body)
        return response.json()["wrap_info"]["token"]

    def lookup_wrapping(self, token: str) -> bool:
        """True while the wrapping token is still unused and unexpired."""
        response = requests.post(f"{self.url}/v1/sys/wrapping/lookup", json={"token": token}, timeout=30)
        return response.status_code == 200

    def open_payload(self, secret_path: str, token: str | None = None) -> dict:
        """The body the dashboard POSTs to /open (PROTOCOL §3)."""
        return {"vault_url": self.url, "vault_token": token or self.wrap_token(),
                "secret_root": "secrets", "secret_path": secret_path,
                "secret_key": "storage_encryption_key"}


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
        # No udev in the guest: make the link it would make.
        volume.by_uuid.parent.mkdir(parents=True, exist_ok=True)
        volume.by_uuid.unlink(missing_ok=True)
        volume.by_uuid.symlink_to(Path("../..") / Path(loop).name)
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


class ServiceUnit:
    """The [Service] settings of a systemd unit that the tests honour, so they run what
    operators run: User=, Group=, RuntimeDirectory=, RuntimeDirectoryMode=, Environment=,
    ExecStart=."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.settings: dict[str, list[str]] = {}
        section = ""
        for line in path.read_text().replace("\\\n", " ").splitlines():
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
    def environment(self) -> dict[str, str]:
        pairs = [item.split("=", 1) for value in self.settings.get("Environment", []) for item in shlex.split(value)]
        return dict(pairs)


class Api:
    """The front-end API started as deploy/luksctl-api.service would start it."""

    base_url = f"https://127.0.0.1:{API_PORT}"

    def __init__(self) -> None:
        self.unit = ServiceUnit(REPO / "deploy" / "luksctl-api.service")
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
            run(str(VENV_BIN / "luksctl-api"), "gen-cert", "--owner", user.pw_name)
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
            wait_until(self._answers, START_TIMEOUT, f"luksctl-api at {self.base_url}")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{tail(self.stderr_log)}")
        try:
            requests.get(f"{self.base_url}/luksctl_api/v1.0/status", verify=False, timeout=5)
            return True
        except requests.RequestException:  # refused, or workers still importing
            return False

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Signals the gunicorn master, e.g. SIGKILL for a crash or SIGHUP for a reload."""
        os.kill(self.pid, sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, 60)
        self.proc = None
        # Workers outlive a SIGKILLed master: each finishes its in-flight requests for up to
        # gunicorn's graceful_timeout (30 s) before it lets go of the port the next start needs.
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


class Dashboard:
    """Calls the API exactly as the dashboard does (PROTOCOL §3), and parses the same way.

    One difference: a timeout. The dashboard sets none; here a hang becomes a failure
    instead of a stuck CI job.
    """

    timeout = 120

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def status(self) -> Reply:
        r = requests.get(f"{self.base_url}/luksctl_api/v1.0/status", verify=False, timeout=self.timeout)
        return Reply(json.loads(r.text)["volume_state"], r)

    def open(self, payload: dict) -> Reply:
        r = requests.post(f"{self.base_url}/luksctl_api/v1.0/open", json=payload, verify=False,
                          timeout=self.timeout)
        return Reply(json.loads(r.text)["volume_state"], r)


class CryptsetupCounter:
    """Counts real cryptsetup runs: luksctl resolves binaries on a fixed PATH that puts
    /usr/local/sbin first, so a wrapper there sees every call."""

    wrapper = Path("/usr/local/sbin/cryptsetup")
    counter = Path("/run/cryptsetup-calls")

    def install(self) -> None:
        self.counter.write_text("")
        # flock: concurrent opens must not lose a line. exec keeps stdin (the passphrase) intact.
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f"flock {self.counter} sh -c 'echo \"$*\" >> {self.counter}' -- \"$@\" </dev/null\n"
            f'exec {CRYPTSETUP} "$@"\n'
        )
        self.wrapper.chmod(0o755)

    def calls(self) -> list[str]:
        """The arguments of each call so far, one string per call (no secrets: they go on stdin)."""
        return self.counter.read_text().splitlines()

    def remove(self) -> None:
        self.wrapper.unlink(missing_ok=True)
        self.counter.unlink(missing_ok=True)
