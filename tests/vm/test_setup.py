"""`luksctl setup` and `fastluks` on a real kernel: blank loop device -> encrypted, stored in a real
OpenBao with the dashboard's write-only wrapping token -> unlocked by the dashboard's flow.

Faults are real too: Vault cut off mid-write (a proxy that drops the connection), SIGKILL of the
whole process group right after luksFormat and during mkfs (found by watching /proc for the
child process, no hook in the product). Refusals are checked byte for byte on the device.

Cheap by design: 40 MiB loop devices (LUKS2's header takes 16), PBKDF2 with 1000 iterations,
the session's OpenBao and API.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import mmap
import os
import re
import secrets
import signal
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from helpers_vm import CRYPTSETUP, HEADER_BACKUP, LUKS_DIR, MOUNTPOINT, OUT, SERVICE_PATH, VENV_BIN, VOLUME_INI, run, stored, wait_until
from support.execlog import ExecRecorder
from support.envlog import EnvRecorder
from support.proc import descends_from, processes
from support.secret_file import write_secret_file
from support.shim import install_shim, remove_shim

LUKSCTL = "/usr/local/sbin/luksctl"
FASTLUKS = str(VENV_BIN / "fastluks")
SUB = "setup-user-sub"
KEY = "storage_encryption_key"
FAST_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
SUCCESS_FILES = {Path("/var/run/fast-luks-encryption.success"): "LUKS encryption completed.",
                 Path("/var/run/fast-luks-volume-setup.success"): "Volume setup completed."}
JOURNAL = [LUKS_DIR / "setup-pending-passphrase", LUKS_DIR / "setup-state.json"]
HEADER_CHECKSUM = HEADER_BACKUP.with_name(HEADER_BACKUP.name + ".sha256")  # as `luksctl header backup` writes it
WORKDIR = Path("/srv/setup-test")


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@dataclass
class Disk:
    image: Path
    loop: str
    cryptdev: str
    deployment: str

    @property
    def secret_path(self) -> str:
        return f"{SUB}/{self.deployment}/storage_encryption"

    def checksum(self) -> str:
        """What the device holds, read with O_DIRECT.

        Not through the page cache: a mounted filesystem's metadata buffers live in the device's
        page cache, and they are not what is on the device. Mounting this ext4 read-only sets the
        journal's 64bit and csum-v3 features in its in-memory journal superblock (jbd2 at mount:
        bytes 0x2b, 0x50 and the checksum at 0xfc of the block at 16 MiB). A buffered read of the
        mounted device sees that; the device itself never gets it (an O_DIRECT read, the image
        file, and a buffered read after umount all match the checksum taken before the mount).
        """
        digest = hashlib.sha256()
        buffer = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT wants
        fd = os.open(self.loop, os.O_RDONLY | os.O_DIRECT)
        try:
            while count := os.readv(fd, [buffer]):
                digest.update(buffer[:count])
        finally:
            os.close(fd)
            buffer.close()
        return digest.hexdigest()


@pytest.fixture
def vault(bao_up):
    """The shared OpenBao, with the dashboard's write_only and read-only policies."""
    return bao_up


def clean_slate() -> None:
    if os.path.ismount(MOUNTPOINT):
        run("umount", str(MOUNTPOINT))
    for path in [VOLUME_INI, HEADER_BACKUP, HEADER_CHECKSUM, *JOURNAL, *SUCCESS_FILES]:
        path.unlink(missing_ok=True)


@pytest.fixture
def blank_disk():
    """A blank 40 MiB loop device; everything setup made on it is undone afterwards."""
    clean_slate()
    WORKDIR.mkdir(parents=True, exist_ok=True)
    MOUNTPOINT.mkdir(exist_ok=True)
    name = "setup" + secrets.token_hex(3)
    image = WORKDIR / f"{name}.img"
    with image.open("xb") as f:
        f.truncate(40 * 1024 * 1024)
    loop = run("losetup", "--find", "--show", str(image)).stdout.decode().strip()
    disk = Disk(image, loop, name, secrets.token_hex(8))
    yield disk
    clean_slate()
    if Path(f"/dev/mapper/{name}").exists():
        run(CRYPTSETUP, "close", name)
    for link in Path("/dev/disk/by-uuid").glob("*") if Path("/dev/disk/by-uuid").exists() else []:
        if link.is_symlink() and os.readlink(link).endswith("/" + Path(loop).name):
            link.unlink()
    run("losetup", "--detach", loop, check=False)
    image.unlink(missing_ok=True)


def token_file(token: str) -> Path:
    return Path(write_secret_file(WORKDIR / f"token-{secrets.token_hex(4)}", token))


def setup_argv(disk: Disk, url: str, token: Path | None, *extra: str, wrapping: bool = True) -> list[str]:
    argv = [LUKSCTL, "setup", "--device", disk.loop, "--cryptdev", disk.cryptdev, "--mountpoint", str(MOUNTPOINT),
            *FAST_PBKDF, "--vault-url", url, "--vault-allow-http", "--secret-path", disk.secret_path]
    if token is not None:
        argv += ["--wrapping-token-file" if wrapping else "--token-file", str(token)]
    return argv + list(extra)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


class Setup:
    """One run of setup as its own process group (so a kill takes its children too, like a power cut)."""

    def __init__(self, argv: list[str], name: str, stdin: bytes = b""):
        OUT.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = OUT / f"{name}.stdout.log", OUT / f"{name}.stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
                                         env={"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"})
        self.proc.stdin.write(stdin)
        self.proc.stdin.close()

    def wait(self, timeout: float = 300) -> Finished:
        self.proc.wait(timeout)
        return Finished(self.proc.returncode, self.stdout_path.read_text(), self.stderr_path.read_text())

    def kill_when_stopped_at(self, tool: str, *needles: bytes, timeout: float = 240) -> list[bytes]:
        """SIGKILL the whole group once a `stopping_at(tool, ...)` wrapper below it has stopped itself.

        The wrapper stops (SIGSTOP) at a fixed point of the command, so the kill lands exactly
        there, however fast or slow the emulated machine is. Watching /proc for the real child
        instead missed a mkfs of a 24 MiB volume that finished between two looks.
        """
        seen: list[bytes] = []

        def stopped() -> bool:
            table = processes()
            for pid, (_ppid, _pgrp, state, argv) in table.items():
                if state == "T" and any(tool.encode() in arg for arg in argv) \
                        and all(any(n in arg for arg in argv) for n in needles) and descends_from(pid, self.proc.pid, table):
                    seen.extend(argv)
                    return True
            if self.proc.poll() is not None:
                raise AssertionError(f"setup ended ({self.proc.returncode}) before {tool} {needles} ran: {self.stderr_path.read_text()}")
            return False

        wait_until(stopped, timeout, f"{tool} {needles} stopped", interval=0.1)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        return seen


@contextlib.contextmanager
def stopping_at(tool: str, real: str, *, when: str, after: bool):
    """A wrapper for `tool` where luksctl looks first (/usr/local/sbin, its fixed PATH): on a call
    whose arguments hold `when`, it stops itself before running the real one (after=False) or
    after it (after=True). Everything else goes straight to the real binary, stdin included."""
    stop = "kill -STOP $$"
    matched = f'"{real}" "$@"; status=$?; {stop}; exit $status' if after else f'{stop}; exec "{real}" "$@"'
    install_shim(tool, f'case " $* " in *" {when} "*) {matched} ;; esac\nexec "{real}" "$@"\n')
    try:
        yield
    finally:
        remove_shim(tool)


def setup_once(argv: list[str], name: str, stdin: bytes = b"") -> Finished:
    return Setup(argv, name, stdin).wait()


def uuid_of(disk: Disk) -> str:
    return run(CRYPTSETUP, "luksUUID", disk.loop).stdout.decode().strip()


def header_digest_now(disk: Disk) -> str:
    """What a header backup taken now would hash to (they are byte copies)."""
    copy = WORKDIR / f"header-{secrets.token_hex(4)}"
    try:
        run(CRYPTSETUP, "luksHeaderBackup", disk.loop, "--header-backup-file", str(copy))
        return hashlib.sha256(copy.read_bytes()).hexdigest()
    finally:
        copy.unlink(missing_ok=True)


def link_by_uuid(disk: Disk) -> None:
    """udev's job, which the guest lacks."""
    link = Path("/dev/disk/by-uuid") / uuid_of(disk)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(Path("../..") / Path(disk.loop).name)


def assert_set_up(disk: Disk, result: Finished) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.path.ismount(MOUNTPOINT)
    for path, text in SUCCESS_FILES.items():
        assert path.read_text() == text
    assert not any(path.exists() for path in JOURNAL)
    assert oct(HEADER_BACKUP.stat().st_mode & 0o777) == "0o600"
    backup_digest = hashlib.sha256(HEADER_BACKUP.read_bytes()).hexdigest()
    assert HEADER_CHECKSUM.read_text() == f"{backup_digest}  {HEADER_BACKUP.name}\n"
    assert backup_digest == header_digest_now(disk)
    ini = VOLUME_INI.read_text()
    assert f"uuid = {uuid_of(disk)}" in ini and f"cryptdev = {disk.cryptdev}" in ini


def dashboard_unlocks(vault, dashboard, disk: Disk) -> None:
    """From closed: the dashboard's open with a read-only wrapped token mounts it."""
    if os.path.ismount(MOUNTPOINT):
        run(LUKSCTL, "close")
    link_by_uuid(disk)
    reply = dashboard.open(vault.open_payload(disk.secret_path))
    assert reply.state == "mounted", reply.response.text


# ---------------------------------------------------------------------------------------------
# 1. blank device -> setup -> the dashboard's unlock; close, open, the data is still there


def test_setup_then_dashboard_unlock_close_and_reopen(vault, dashboard, api, blank_disk):
    disk = blank_disk
    unwrapped = "setupunwrapped" + secrets.token_hex(10)
    wrapping = vault.write_only_wrapping_token(unwrapped)
    with EnvRecorder() as environments, ExecRecorder() as execs:
        result = setup_once(setup_argv(disk, vault.url, token_file(wrapping), "--wipe", "--json"), "setup-main")
    assert_set_up(disk, result)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["event"] == "result" and lines[-1]["volume_state"] == "mounted"
    wipe = [line for line in lines if line["event"] == "wipe"]
    assert wipe and wipe[-1]["percent"] == 100 and wipe[-1]["bytes_done"] == 24 * 1024 * 1024
    assert set(lines[-1]["seconds"]) == {"vault", "format", "wipe", "mkfs"}

    passphrase = stored(vault, disk.secret_path)
    assert len(passphrase) == 64
    # Neither the passphrase nor the unwrapped token was in any argv, environment or log.
    assert execs.ran(b"cryptsetup") and environments.ran(b"cryptsetup"), "no exec of cryptsetup recorded"
    for needle in (passphrase.encode(), unwrapped.encode(), wrapping.encode()):
        assert not execs.hits({"secret": needle})
        assert not environments.hits({"secret": needle})
        for log in (OUT / "setup-main.stdout.log", OUT / "setup-main.stderr.log"):
            assert needle not in log.read_bytes()
    assert not vault.lookup_wrapping(wrapping)
    # The unwrapped token was revoked at the end.
    assert requests.post(f"{vault.url}/v1/auth/token/lookup-self", headers={"X-Vault-Token": unwrapped}, timeout=30).status_code == 403

    (MOUNTPOINT / "before-close.txt").write_text("written right after setup")
    dashboard_unlocks(vault, dashboard, disk)
    assert (MOUNTPOINT / "before-close.txt").read_text() == "written right after setup"
    assert run(LUKSCTL, "close").returncode == 0
    dashboard_unlocks(vault, dashboard, disk)
    assert (MOUNTPOINT / "before-close.txt").read_text() == "written right after setup"

    # Run again: nothing to do, and the token it is given stays unused.
    again = vault.write_only_wrapping_token()
    result = setup_once(setup_argv(disk, vault.url, token_file(again)), "setup-again")
    assert result.returncode == 0 and "already set up" in result.stdout
    assert vault.lookup_wrapping(again)


# ---------------------------------------------------------------------------------------------
# 2. faults: each ends in a volume the dashboard's flow unlocks


class CuttingProxy(http.server.ThreadingHTTPServer):
    """Forwards to OpenBao, but drops the connection on the secret write: before forwarding it
    (the write never lands) or after (it lands, the answer is lost)."""

    def __init__(self, target: str, *, forward_the_write: bool):
        self.target = urllib.parse.urlsplit(target)
        self.forward_the_write = forward_the_write
        self.cut = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy: CuttingProxy = self.server  # type: ignore[assignment]
        is_write = self.command == "POST" and self.path.startswith("/v1/secrets/data/")
        if is_write and not proxy.forward_the_write:
            proxy.cut += 1
            self.close_connection = True
            self.connection.shutdown(2)
            return
        upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("x-vault-token", "content-type", "x-vault-request")}
        upstream.request(self.command, self.path, body=body or None, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        if is_write:
            proxy.cut += 1
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_vault_cut_off_mid_write_then_rerun_with_a_new_token(vault, dashboard, api, blank_disk):
    disk = blank_disk
    before = disk.checksum()
    proxy = CuttingProxy(vault.url, forward_the_write=False)
    try:
        result = setup_once(setup_argv(disk, proxy.url, token_file(vault.write_only_wrapping_token())), "setup-cut")
    finally:
        proxy.shutdown()
    assert result.returncode == 15 and proxy.cut == 1, result.stdout + result.stderr  # Vault unreachable
    assert disk.checksum() == before  # Vault comes before the format: the device is untouched
    assert all(path.exists() for path in JOURNAL)

    result = setup_once(setup_argv(disk, vault.url, token_file(vault.write_only_wrapping_token())), "setup-cut-rerun")
    assert_set_up(disk, result)
    assert stored(vault, disk.secret_path) and "resum" in result.stderr
    dashboard_unlocks(vault, dashboard, disk)


def test_lost_write_answer_is_resolved_with_the_read_only_token(vault, dashboard, api, blank_disk):
    disk = blank_disk
    proxy = CuttingProxy(vault.url, forward_the_write=True)
    try:
        result = setup_once(setup_argv(disk, proxy.url, token_file(vault.write_only_wrapping_token())), "setup-lost")
    finally:
        proxy.shutdown()
    assert result.returncode == 15, result.stdout + result.stderr
    saved = JOURNAL[0].read_bytes()
    assert stored(vault, disk.secret_path) == saved.decode()  # it landed; setup could not know

    # A create-only token cannot tell whose secret is there: refused, journal kept, device untouched.
    result = setup_once(setup_argv(disk, vault.url, token_file(vault.write_only_wrapping_token())), "setup-lost-2")
    assert result.returncode == 16 and "may not read" in result.stdout, result.stdout + result.stderr
    assert JOURNAL[0].read_bytes() == saved
    # The dashboard's read-only wrapping token can: it is ours, and setup finishes.
    result = setup_once(setup_argv(disk, vault.url, token_file(vault.wrap_token())), "setup-lost-3")
    assert_set_up(disk, result)
    dashboard_unlocks(vault, dashboard, disk)


def test_sigkill_right_after_luks_format_then_rerun(vault, dashboard, api, blank_disk):
    disk = blank_disk
    # The passphrase check follows luksFormat at once: killed as it starts, setup is between the two steps.
    with stopping_at("cryptsetup", CRYPTSETUP, when="--test-passphrase", after=False):
        run_ = Setup(setup_argv(disk, vault.url, token_file(vault.write_only_wrapping_token())), "setup-kill-format")
        run_.kill_when_stopped_at("cryptsetup", b"--test-passphrase")
    assert run(CRYPTSETUP, "isLuks", disk.loop, check=False).returncode == 0
    state = json.loads(JOURNAL[1].read_text())
    assert "format-started" in state["steps"] and "formatted" not in state["steps"], state

    result = setup_once(setup_argv(disk, vault.url, None), "setup-kill-format-rerun")  # Vault has it: no token
    assert_set_up(disk, result)
    dashboard_unlocks(vault, dashboard, disk)


def test_sigkill_during_mkfs_of_fastluks_then_rerun(vault, dashboard, api, blank_disk):
    """The deployed role's own command line, token in argv (the documented exception)."""
    disk = blank_disk
    unwrapped = "fastluksunwrapped" + secrets.token_hex(10)
    wrapping = vault.write_only_wrapping_token(unwrapped)
    argv = [FASTLUKS, "--device", disk.loop, "--cryptdev", disk.cryptdev, "-m", str(MOUNTPOINT), "-f", "ext4",
            "-c", "aes-xts-plain64", "-s", "256", "--hash", "sha256", "--header-backup-file", str(HEADER_BACKUP),
            "--cryptdev-file", str(VOLUME_INI), "-l", "64", "--vault", "--vault-url", vault.url, "--vault-allow-http",
            "--wrapping-token", wrapping, "--secret-path", disk.secret_path, "--user-key", KEY, *FAST_PBKDF]
    with EnvRecorder() as environments, ExecRecorder() as execs:
        # Killed once mkfs has written its filesystem but before setup saw it finish: the journal
        # says mkfs-started, not mkfs-done, as for a kill halfway through.
        with stopping_at("mkfs.ext4", "/sbin/mkfs.ext4", when=f"/dev/mapper/{disk.cryptdev}", after=True):
            Setup(argv, "fastluks-kill-mkfs").kill_when_stopped_at("mkfs.ext4")
        steps = json.loads(JOURNAL[1].read_text())["steps"]
        assert "mkfs-started" in steps and "mkfs-done" not in steps, steps
        killed_fs = run("blkid", "-p", "-s", "UUID", "-o", "value", f"/dev/mapper/{disk.cryptdev}").stdout.strip()
        assert killed_fs  # mkfs did write a filesystem before the kill
        result = setup_once(argv, "fastluks-kill-mkfs-rerun")
    assert_set_up(disk, result)
    # The re-run did not trust the filesystem it found: it wiped it and made a new one.
    assert run("blkid", "-p", "-s", "UUID", "-o", "value", f"/dev/mapper/{disk.cryptdev}").stdout.strip() not in (killed_fs, b"")
    dump = run(CRYPTSETUP, "luksDump", disk.loop).stdout.decode()
    assert re.search(r"Key:\s+256 bits", dump) and "aes-xts-plain64" in dump  # the older tools' defaults
    passphrase = stored(vault, disk.secret_path).encode()
    # The argv token shows on fastluks's argv: the one documented exception. Nothing else does.
    assert execs.hits({"wrapping token": wrapping.encode()})
    assert not execs.hits({"passphrase": passphrase, "unwrapped token": unwrapped.encode()})
    assert not environments.hits({"wrapping token": wrapping.encode(), "passphrase": passphrase,
                                  "unwrapped token": unwrapped.encode()})
    for name in ("fastluks-kill-mkfs", "fastluks-kill-mkfs-rerun"):
        for suffix in ("stdout", "stderr"):
            log = (OUT / f"{name}.{suffix}.log").read_bytes()
            assert wrapping.encode() not in log and passphrase not in log and unwrapped.encode() not in log
    dashboard_unlocks(vault, dashboard, disk)


# ---------------------------------------------------------------------------------------------
# 3. refusals leave the device byte-identical


def test_refusals_change_nothing(vault, blank_disk):
    disk = blank_disk
    token = token_file(vault.write_only_wrapping_token())
    run("mkfs.ext4", "-q", disk.loop)
    signed = disk.checksum()
    result = setup_once(setup_argv(disk, vault.url, token), "refuse-signed")
    assert result.returncode == 12 and "not blank (signature ext4" in result.stdout, result.stdout
    assert disk.checksum() == signed

    run("mount", "-o", "ro", disk.loop, str(MOUNTPOINT))
    try:
        result = setup_once(setup_argv(disk, vault.url, token, "--force"), "refuse-mounted")  # --force never overrides this
        assert result.returncode == 10 and "is mounted on" in result.stdout, result.stdout
        assert disk.checksum() == signed
    finally:
        run("umount", str(MOUNTPOINT))
    with open(disk.loop, "rb") as device:  # and through the page cache, now that nothing holds it
        assert hashlib.file_digest(device, "sha256").hexdigest() == signed

    regular = WORKDIR / "not-a-device.img"
    regular.write_bytes(b"\x5a" * 65536)
    result = setup_once([LUKSCTL, "setup", "--device", str(regular), "--vault-url", vault.url, "--vault-allow-http",
                         "--secret-path", disk.secret_path, "--wrapping-token-file", str(token)], "refuse-file")
    assert result.returncode == 11 and "not a block device" in result.stdout, result.stdout
    assert regular.read_bytes() == b"\x5a" * 65536
    regular.unlink()
    assert vault.lookup_wrapping(token.read_text().strip())  # no refusal spent the token
    assert not any(path.exists() for path in [*JOURNAL, VOLUME_INI, HEADER_BACKUP, HEADER_CHECKSUM])
