"""The harness itself works: if these fail, the other VM tests' failures mean nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import requests

from helpers_vm import MOUNTPOINT, REPO, run


def test_bao_wraps_a_read_only_token_that_reads_the_passphrase_once(bao_up):
    secret_path = bao_up.store_passphrase("user-sub", "deployment-uuid", "s3cret pass")
    wrapping = bao_up.wrap_token()
    assert bao_up.lookup_wrapping(wrapping)

    unwrapped = bao_up.request("POST", "sys/wrapping/unwrap", token=wrapping).json()
    token = unwrapped["auth"]["client_token"]
    secret = bao_up.request("GET", f"secrets/data/{secret_path}", token=token).json()
    assert secret["data"]["data"]["storage_encryption_key"] == "s3cret pass"
    assert not bao_up.lookup_wrapping(wrapping)
    # The policy is read-only.
    denied = requests.post(f"{bao_up.url}/v1/secrets/data/{secret_path}", timeout=30,
                           headers={"X-Vault-Token": token}, json={"data": {"x": "y"}})
    assert denied.status_code == 403


def test_bao_can_go_down_and_come_back(bao_up):
    bao_up.stop()
    try:
        requests.get(f"{bao_up.url}/v1/sys/health", timeout=5)
        raise AssertionError("OpenBao still answers after stop()")
    except requests.ConnectionError:
        pass
    bao_up.start()
    assert bao_up.lookup_wrapping(bao_up.wrap_token())


def test_volume_opens_with_its_exact_passphrase_and_mounts(luks_volume):
    volume = luks_volume(" pass with spaces and a trailing space ")
    assert os.readlink(volume.by_uuid) == f"../../{Path(volume.loop).name}"
    assert f"uuid = {volume.uuid}" in Path("/etc/luks/luks-cryptdev.ini").read_text()

    wrong = run("cryptsetup", "open", "--key-file=-", str(volume.by_uuid), volume.cryptdev,
                input=volume.passphrase + b"\n", check=False)
    assert wrong.returncode != 0  # the newline is not part of the passphrase
    run("cryptsetup", "open", "--key-file=-", str(volume.by_uuid), volume.cryptdev, input=volume.passphrase)
    run("mount", volume.mapper, str(MOUNTPOINT))
    (MOUNTPOINT / "data").write_text("kept")
    run("umount", str(MOUNTPOINT))
    run("cryptsetup", "close", volume.cryptdev)


def test_factory_makes_several_volumes_and_the_ini_names_the_newest(luks_volume, cryptsetup_calls):
    first = luks_volume("one")
    second = luks_volume("$(touch /tmp/pwned); 'two'\"")
    assert first.uuid != second.uuid
    assert f"uuid = {second.uuid}" in Path("/etc/luks/luks-cryptdev.ini").read_text()
    # The counting wrapper hands stdin through untouched, or this passphrase would not match.
    run(str(cryptsetup_calls.wrapper), "open", "--test-passphrase", "--key-file=-", second.loop,
        input=second.passphrase)
    assert cryptsetup_calls.calls() == [f"open --test-passphrase --key-file=- {second.loop}"]


def test_deployed_sudoers_file_is_valid():
    installed = Path("/etc/sudoers.d/luksctl-api")
    assert installed.read_bytes() == (REPO / "deploy/sudoers.d/luksctl-api").read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o440
    subprocess.run(["visudo", "-cf", str(installed)], check=True, capture_output=True)


def test_api_answers_status_over_https(luks_volume, dashboard):
    luks_volume()
    reply = dashboard.status()
    assert reply.state == "unmounted", reply.response.text


def test_api_opens_with_a_wrapped_passphrase_through_sudo(bao_up, luks_volume, dashboard):
    # Proves the guest set-up the service depends on: users, shadow lines, no /run/nologin, sudoers.
    volume = luks_volume("unlock me")
    secret_path = bao_up.store_passphrase("user-sub", volume.uuid, "unlock me")
    payload = bao_up.open_payload(secret_path)
    reply = dashboard.open(payload)
    assert reply.state == "mounted", reply.response.text
    assert os.path.ismount(MOUNTPOINT)
    assert not bao_up.lookup_wrapping(payload["vault_token"])
    assert dashboard.status().state == "mounted"
