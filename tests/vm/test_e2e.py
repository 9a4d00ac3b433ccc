"""The whole single-VM system end to end on a real kernel: dashboard -> HTTPS API (gunicorn as
luksctl_api, started from the unit's ExecStart) -> Vault (OpenBao) -> sudo -> luksctl ->
cryptsetup/dm-crypt/mount, and back. PROTOCOL §3 semantics; every answer is parsed the
dashboard's way (Dashboard).

Costs under software emulation: starting a process takes seconds, so one LUKS volume is shared
by most tests (the `volume` fixture closes it before each), the API keeps the default config
all along (the failed-open counter is emptied around each test instead of switching the limit
off by a restart), and the kernel's side is set up directly as root where it is not the subject.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import signal
import socket
import string
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from helpers_vm import (
    CRYPTSETUP,
    MOUNTPOINT,
    OUT,
    Api,
    Bao,
    Dashboard,
    Reply,
    Volume,
    VolumeFactory,
    clear_failed_opens,
    kernel_state,
    put_back_closed,
    run,
    single_vm_config,
    wait_until,
)
from leaks import watch_for_leaks
from support.proc import is_privileged_open, processes

LUKSCTL = "/usr/local/sbin/luksctl"
SHARED_PASSPHRASE = "e2e shared volume passphrase " + secrets.token_hex(8)
SUB = "e2e-user-sub"
RUNTIME_DIR = Path("/run/luksctl-api")
API_LOCK = RUNTIME_DIR / "open.lock"
DEFAULT_VAULT_TIMEOUT = 10  # FrontendConfig.VAULT_TIMEOUT; the tests keep the default config
PWNED = Path("/tmp/pwned")


# ---------------------------------------------------------------------------------------------
# The kernel's view and the process table, read directly (what the API must agree with)


def privileged_opens() -> list[int]:
    return [pid for pid, process in processes().items() if is_privileged_open(process.argv)]


def open_directly(volume: Volume) -> None:
    run(CRYPTSETUP, "open", "--key-file=-", str(volume.by_uuid), volume.cryptdev, input=volume.passphrase)
    run("mount", volume.mapper, str(MOUNTPOINT))


def assert_json_error(reply, status: int, state: str) -> None:
    body = reply.response.json()
    assert reply.response.status_code == status, reply.response.text
    assert reply.state == state, reply.response.text
    assert isinstance(body.get("error"), str) and body["error"], reply.response.text
    assert reply.response.headers["Content-Type"].startswith("application/json")


def open_in_thread(dashboard: Dashboard, payload: dict) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def call():
        try:
            box["reply"] = dashboard.open(payload)
        except (requests.RequestException, ValueError, KeyError) as exc:  # a killed worker drops the connection
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, box


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def shared_volumes():
    factory = VolumeFactory()
    yield factory
    factory.cleanup()


@pytest.fixture
def volume(shared_volumes) -> Volume:
    """One volume for the module, named by the ini and closed at the start of every test."""
    if not shared_volumes.volumes:
        shared_volumes(SHARED_PASSPHRASE)
    vol = shared_volumes.volumes[0]
    vol.write_ini()  # a per-test factory may have named another volume, or removed the file
    put_back_closed(vol)
    return vol


@pytest.fixture(autouse=True)
def no_failed_opens_counted():
    """Tests here fail opens on purpose; the default limit (5 per 300 s) stays on regardless."""
    clear_failed_opens()
    yield
    clear_failed_opens()


@pytest.fixture
def secret_path(bao_up, volume) -> str:
    """The shared volume's passphrase stored where the dashboard keeps it (again after a Bao restart)."""
    return bao_up.store_passphrase(SUB, volume.uuid, SHARED_PASSPHRASE)


# ---------------------------------------------------------------------------------------------
# 1. open -> mounted, really encrypted; a second open leaves its token alone


def test_open_mounts_an_encrypted_filesystem_and_a_second_open_uses_no_token(bao_up, volume, secret_path, dashboard):
    assert dashboard.status().state == "unmounted"
    payload = bao_up.open_payload(secret_path)
    reply = dashboard.open(payload)
    assert reply.state == "mounted", reply.response.text
    assert reply.response.status_code == 200
    assert dashboard.status().state == "mounted"
    assert kernel_state(volume) == ("mounted", True)
    assert not bao_up.lookup_wrapping(payload["vault_token"])  # used by the open

    # The plaintext reaches the decrypted device, and only ciphertext reaches the disk.
    marker = f"E2E-PLAINTEXT-MARKER-{secrets.token_hex(24)}|".encode()
    (MOUNTPOINT / "marker.txt").write_bytes(marker * (65536 // len(marker)))
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert marker in Path(volume.mapper).read_bytes(), "the marker never reached the mapper device"
    assert marker not in Path(volume.loop).read_bytes(), f"plaintext on the raw device {volume.loop}"
    assert marker not in volume.image.read_bytes(), f"plaintext in the image {volume.image}"

    second = bao_up.open_payload(secret_path)
    reply = dashboard.open(second)
    assert reply.state == "mounted", reply.response.text
    assert bao_up.lookup_wrapping(second["vault_token"]), "an open of a mounted volume consumed its token"


# ---------------------------------------------------------------------------------------------
# 2. the root CLI closes; the API opens again


def test_luksctl_close_then_open_again(bao_up, volume, secret_path, dashboard):
    open_directly(volume)
    kept = secrets.token_hex(16)
    (MOUNTPOINT / "kept.txt").write_text(kept)
    assert dashboard.status().state == "mounted"

    closed = subprocess.run([LUKSCTL, "close"], check=False, capture_output=True, text=True, timeout=300)
    assert closed.returncode == 0, closed.stdout + closed.stderr
    assert "Encrypted volume umount: [ OK ]" in closed.stdout, closed.stdout + closed.stderr
    assert dashboard.status().state == "unmounted"
    assert kernel_state(volume) == ("unmounted", False)
    assert not Path(volume.mapper).exists()

    payload = bao_up.open_payload(secret_path)
    reply = dashboard.open(payload)
    assert reply.state == "mounted", reply.response.text
    assert not bao_up.lookup_wrapping(payload["vault_token"])
    assert (MOUNTPOINT / "kept.txt").read_text() == kept
    assert kernel_state(volume) == ("mounted", True)


# ---------------------------------------------------------------------------------------------
# 3. failures: wrong passphrase, used and expired tokens, Vault down or silent


def test_wrong_passphrase_in_vault_leaves_nothing_open_and_no_secret_anywhere(bao_up, shared_volumes, luks_volume, dashboard, api):
    for earlier in shared_volumes.volumes:  # the test before may have left the module's volume mounted
        put_back_closed(earlier)
    # The deployed PBKDF (argon2id, ~2 s a try): the wrong passphrase costs what it costs a real volume.
    volume = luks_volume("e2e volume for the wrong passphrase " + secrets.token_hex(8), test_kdf=False)
    wrong = "not the passphrase " + secrets.token_hex(8)
    wrong_path = bao_up.store_passphrase(SUB, volume.uuid + "-wrong", wrong)
    unwrapped = "e2ewrong" + secrets.token_hex(12)
    wrapping = bao_up.wrap_token(token_id=unwrapped)
    needles = {"wrong passphrase": wrong.encode(), "passphrase": volume.passphrase,
               "wrapping token": wrapping.encode(), "unwrapped token": unwrapped.encode()}
    with watch_for_leaks(needles) as watch:
        reply = dashboard.open(bao_up.open_payload(wrong_path, wrapping))
    assert_json_error(reply, 422, "unmounted")
    assert watch.environments.ran(b"cryptsetup"), "no environment of cryptsetup recorded"
    assert watch.execs.ran(b"cryptsetup"), "no exec of cryptsetup recorded"
    watch.assert_nothing_leaked()
    assert watch.cli_audit_lines() == [("open", f"uid {service_uid(api)}", "error", 2)]  # exit 2: wrong passphrase
    assert kernel_state(volume) == ("unmounted", False)
    assert not Path(volume.mapper).exists(), f"{volume.mapper} left behind"
    assert not os.path.ismount(MOUNTPOINT)


def mount_options(mountpoint: Path) -> set[str]:
    """The per-mount options of the topmost mount on `mountpoint`, from mountinfo."""
    found = [line.split(" ")[5] for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if line.split(" ")[4] == str(mountpoint)]
    assert found, f"nothing mounted on {mountpoint}"
    return set(found[-1].split(","))


def test_mapped_but_unmounted_volume_needs_the_right_secret_and_mounts_nosuid_nodev(bao_up, volume, secret_path,
                                                                                   dashboard):
    # As an operator leaves it to fsck: mapped, not mounted. The mapping proves nothing about the caller.
    run(CRYPTSETUP, "open", "--key-file=-", str(volume.by_uuid), volume.cryptdev, input=volume.passphrase)
    assert kernel_state(volume) == ("unmounted", True)

    wrong_path = bao_up.store_passphrase(SUB, volume.uuid + "-wrong", "not " + SHARED_PASSPHRASE)
    reply = dashboard.open(bao_up.open_payload(wrong_path))
    assert_json_error(reply, 422, "unmounted")
    assert kernel_state(volume) == ("unmounted", True), "the mapping, not ours, must stay as it was"

    reply = dashboard.open(bao_up.open_payload(secret_path))
    assert (reply.response.status_code, reply.state) == (200, "mounted"), reply.response.text
    assert kernel_state(volume) == ("mounted", True)
    assert {"nosuid", "nodev"} <= mount_options(MOUNTPOINT)  # MOUNT_OPTIONS' default


def test_used_and_expired_wrapping_tokens_are_refused(bao_up, volume, secret_path, dashboard):
    used = bao_up.wrap_token()
    bao_up.request("POST", "sys/wrapping/unwrap", token=used)  # someone else got there first
    reply = dashboard.open(bao_up.open_payload(secret_path, used))
    assert_json_error(reply, 403, "unmounted")

    expired = bao_up.wrap_token(ttl="1s")
    wait_until(lambda: not bao_up.lookup_wrapping(expired), 30, "the 1 s wrapping token to expire")
    reply = dashboard.open(bao_up.open_payload(secret_path, expired))
    assert_json_error(reply, 403, "unmounted")
    assert kernel_state(volume) == ("unmounted", False)


def test_vault_down_or_silent_answers_502_within_the_vault_timeout(bao_up, volume, secret_path, api, dashboard):
    # The silent server's port is chosen below: this API may contact any URL (the operator's opt-out).
    api.ensure({"INFRASTRUCTURE_CONFIGURATION": "single_vm", "ALLOW_ANY_VAULT_URL": True, "ALLOW_PLAIN_HTTP": True})
    margin = 20  # TLS, Flask and a busy emulated CPU; the point is "bounded", not "fast"
    payload = bao_up.open_payload(secret_path)
    bao_up.stop()  # connection refused (the next test's bao_up starts it again)
    started = time.monotonic()
    reply = dashboard.open(payload)
    elapsed = time.monotonic() - started
    assert_json_error(reply, 502, "unmounted")
    assert elapsed < DEFAULT_VAULT_TIMEOUT + margin, elapsed

    # A Vault that accepts the connection and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        started = time.monotonic()
        reply = dashboard.open({**payload, "vault_url": f"http://127.0.0.1:{port}"})
        elapsed = time.monotonic() - started
    assert_json_error(reply, 502, "unmounted")
    assert DEFAULT_VAULT_TIMEOUT * 0.9 <= elapsed < DEFAULT_VAULT_TIMEOUT + margin, elapsed
    assert kernel_state(volume) == ("unmounted", False)


# ---------------------------------------------------------------------------------------------
# 4. passphrases that broke the old shell-based tools


# Related breakages share a volume (each volume costs seconds to format and open under
# emulation); every one of them alone would already make the open fail or run a command.
HOSTILE_PASSPHRASES = {
    "double-quotes-semicolon": '"; touch /tmp/pwned; "',
    "dollar-paren-backticks": "$(id)$(touch /tmp/pwned)`touch /tmp/pwned`",
    "single-quotes": "it's 'quoted'; touch /tmp/pwned; '",
    "spaces-backslashes": "   C:\\new\\table\\ \\\"x\\ and a trailing one\\   ",
    "non-ascii": "pässwörd ünïcödé 密码 🔐 ç",
    "512-bytes": "".join(secrets.choice(string.ascii_letters + string.digits + string.punctuation + " ")
                         for _ in range(512)),
}
assert len(HOSTILE_PASSPHRASES["512-bytes"].encode()) == 512


@pytest.mark.parametrize("passphrase", list(HOSTILE_PASSPHRASES.values()), ids=list(HOSTILE_PASSPHRASES))
def test_hostile_passphrase_opens_and_executes_nothing(bao_up, luks_volume, dashboard, passphrase):
    PWNED.unlink(missing_ok=True)
    vol = luks_volume(passphrase)  # formatted with exactly these bytes
    path = bao_up.store_passphrase(SUB, vol.uuid, passphrase)
    reply = dashboard.open(bao_up.open_payload(path))
    assert reply.state == "mounted", reply.response.text
    assert kernel_state(vol) == ("mounted", True)
    assert not PWNED.exists(), "a passphrase was executed"
    # luks_volume's cleanup closes it.


# ---------------------------------------------------------------------------------------------
# 5. ten concurrent opens: one cryptsetup open, one token used


def test_ten_concurrent_opens_run_cryptsetup_once(bao_up, volume, secret_path, api, dashboard, cryptsetup_calls):
    # An open in flight counts toward FAILED_OPEN_LIMIT until it succeeds (README): this test is
    # about the open lock, so the limiter (and earlier tests' failures) stay out of it.
    api.ensure(single_vm_config(bao_up, FAILED_OPEN_LIMIT=0))
    payloads = [bao_up.open_payload(secret_path) for _ in range(10)]
    replies: list = [None] * len(payloads)
    sent: list[float] = [0.0] * len(payloads)
    answered: list[float] = [0.0] * len(payloads)

    def call(index: int) -> None:
        sent[index] = time.monotonic()
        try:
            replies[index] = dashboard.open(payloads[index])
        except BaseException as exc:  # noqa: BLE001 - kept for the assertion
            replies[index] = exc
        answered[index] = time.monotonic()

    # Staggered by a fraction of one open's duration: all ten still overlap (checked below),
    # but ten TLS handshakes at the same instant would starve the emulated CPU; gunicorn's
    # gthread worker drops a connection that sends nothing for 5 s + keepalive (2 s).
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    for thread in threads:
        thread.join(Dashboard.timeout + 30)
    assert [getattr(r, "state", None) for r in replies] == ["mounted"] * 10, [
        r.response.text if isinstance(r, Reply) else repr(r) for r in replies]
    assert max(sent) < min(answered), "the ten opens did not overlap"
    opens = [call for call in cryptsetup_calls.calls() if call.startswith("open")]
    assert len(opens) == 1, cryptsetup_calls.calls()
    unused = [bao_up.lookup_wrapping(p["vault_token"]) for p in payloads]
    assert unused.count(True) == 9, unused
    assert kernel_state(volume) == ("mounted", True)


# ---------------------------------------------------------------------------------------------
# 6. no secret in any process's argv or environment, nor in any log


def test_no_secret_in_processes_or_logs(bao_up, volume, dashboard, api):
    passphrase = SHARED_PASSPHRASE
    # The secret path of this test only, and an unwrapped token whose id we know.
    path = bao_up.store_passphrase(SUB, volume.uuid, passphrase)
    unwrapped = "e2eunwrapped" + secrets.token_hex(12)
    wrapping = bao_up.wrap_token(token_id=unwrapped)
    assert bao_up.request("POST", "auth/token/lookup", json={"token": unwrapped}).json()["data"]["id"] == unwrapped
    needles = {"passphrase": passphrase.encode(), "wrapping token": wrapping.encode(),
               "unwrapped token": unwrapped.encode()}

    with watch_for_leaks(needles) as watch:
        reply = dashboard.open(bao_up.open_payload(path, wrapping))
    assert reply.state == "mounted", reply.response.text
    assert watch.environments.ran(b"sudo") and watch.environments.ran(b"luksctl"), "no environment of sudo and luksctl recorded"
    assert any(is_privileged_open(started.argv) for started in watch.execs.execs), "no exec of sudo/luksctl open recorded"
    watch.assert_nothing_leaked()
    # The unwrapped token was revoked after the read.
    lookup = requests.post(f"{bao_up.url}/v1/auth/token/lookup", json={"token": unwrapped},
                           headers={"X-Vault-Token": "root"}, timeout=30)
    assert lookup.status_code in (400, 403), lookup.text
    assert watch.cli_audit_lines() == [("open", f"uid {service_uid(api)}", "ok", 0)]  # SUDO_UID: the service user
    api_log = b"".join(p.read_bytes() for p in OUT.glob(f"api.{api.starts}.stdout.log"))
    assert b'"action": "open"' in api_log and b'"outcome": "ok"' in api_log, "no audit line for the open"


def service_uid(api: Api) -> int:
    return pwd.getpwnam(api.unit.one("User")).pw_uid


# ---------------------------------------------------------------------------------------------
# 7. a worker, then the master, killed while an open is in flight


def _kill_mid_open(api: Api, dashboard: Dashboard, payload: dict, kill_master: bool) -> tuple[threading.Thread, dict]:
    thread, box = open_in_thread(dashboard, payload)
    holder: list[int] = []

    def privileged_call_running() -> bool:
        table = processes()
        workers = {pid for pid, process in table.items() if process.ppid == api.pid}
        for pid, process in table.items():
            if is_privileged_open(process.argv):
                ancestor = pid
                while ancestor in table and ancestor not in workers and ancestor > 1:
                    ancestor = table[ancestor].ppid
                if ancestor in workers:
                    holder.append(ancestor)
                    return True
        return False

    wait_until(privileged_call_running, 90, "sudo luksctl open under a gunicorn worker", interval=0.05)
    os.kill(api.pid if kill_master else holder[0], signal.SIGKILL)
    return thread, box


def _state_is_true_and_lock_is_free(api: Api, dashboard: Dashboard, volume: Volume, bao: Bao, secret_path: str) -> None:
    # The orphaned sudo/luksctl finishes (or fails) on its own; then the kernel's word is final.
    wait_until(lambda: not privileged_opens(), 200, "the orphaned luksctl open to finish")
    truth = kernel_state(volume)
    # Whole either way: mapped and mounted, or neither (never mapped but not mounted).
    assert truth in (("mounted", True), ("unmounted", False)), f"half-open after the kill: {truth}"
    assert dashboard.status().state == truth[0]
    with API_LOCK.open("a") as lock:  # nobody holds the API's open lock any more
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(lock, fcntl.LOCK_UN)
    # A later open really goes through the lock: start from a closed volume.
    put_back_closed(volume)
    assert dashboard.status().state == "unmounted"
    payload = bao.open_payload(secret_path)
    reply = dashboard.open(payload)
    assert reply.state == "mounted", reply.response.text
    assert not bao.lookup_wrapping(payload["vault_token"])
    assert kernel_state(volume) == ("mounted", True)


def test_worker_killed_mid_open(bao_up, volume, secret_path, api, dashboard):
    thread, box = _kill_mid_open(api, dashboard, bao_up.open_payload(secret_path), kill_master=False)
    thread.join(Dashboard.timeout + 10)
    # The killed worker held the proxy's connection to gunicorn: the proxy answers for it, in JSON.
    assert set(box) == {"reply"}, box
    assert box["reply"].response.status_code == 502 and box["reply"].state == "unavailable", box["reply"].response.text
    assert api.proc.poll() is None, "the master died with its worker"
    _state_is_true_and_lock_is_free(api, dashboard, volume, bao_up, secret_path)


def test_master_killed_mid_open_then_restarted(bao_up, volume, secret_path, api, dashboard):
    thread, _ = _kill_mid_open(api, dashboard, bao_up.open_payload(secret_path), kill_master=True)
    api.proc.wait(30)
    api.restart(api.config)  # what systemd's Restart=on-failure does, same ExecStart
    thread.join(Dashboard.timeout + 10)
    _state_is_true_and_lock_is_free(api, dashboard, volume, bao_up, secret_path)


# ---------------------------------------------------------------------------------------------
# 3b. the failed-open limit, once


def test_failed_open_limit_answers_429_and_contacts_nothing(bao_up, volume, secret_path, dashboard):
    incomplete = {"vault_url": bao_up.url, "vault_token": "x"}  # 400: three fields missing
    for _ in range(5):  # FAILED_OPEN_LIMIT's default
        assert_json_error(dashboard.open(incomplete), 400, "unmounted")
    payload = bao_up.open_payload(secret_path)
    reply = dashboard.open(payload)
    assert_json_error(reply, 429, "unmounted")
    assert 1 <= int(reply.response.headers["Retry-After"]) <= 300
    assert bao_up.lookup_wrapping(payload["vault_token"]), "a refused caller's token was used"
    assert kernel_state(volume) == ("unmounted", False)
