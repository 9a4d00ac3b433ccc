"""Boot 2 of the power-cut pair (scripts/vm-powercut.sh): the first boot was hard-reset (sysrq b,
no sync, nothing written back but what was fsynced) with a command stopped at each step of setup
and rotate, and in the middle of an online `luksctl reencrypt`. Here, on the same persistent disk,
with the same OpenBao storage: each command run again, as an operator (or the Ansible role) would,
then the dashboard's open with the passphrase in Vault. Goal: 0 volumes lost."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from helpers_vm import CRYPTSETUP, MOUNTPOINT, Volume, opens, put_back_closed, reencrypting, run, stored, token_file, volume_key_digest
from persistent_disk import (
    CUT_POINTS, LUKSCTL, NOTES, PASSPHRASE, PERSIST, ROTATE_POLICY, SERVICE_ENV, CutPoint, etc_luks, rotate_argv, setup_argv, the_volume, wrapping_token_file)

SUB = "powercut-user-sub"
# What an unfinished setup or rotation keeps in /etc/luks (README), and what an interrupted write leaves.
UNFINISHED = ("setup-pending-passphrase", "setup-state.json", "rotate-pending.json")


@pytest.fixture(scope="module")
def notes(persistent):
    """The notes boot 1 left on the persistent disk."""
    return json.loads(NOTES.read_text())


def reference_sha256() -> str:
    return hashlib.sha256((MOUNTPOINT / "reference.bin").read_bytes()).hexdigest()


def test_cut_mid_reencryption_then_the_dashboard_opens_and_a_rerun_resumes_byte_exact(notes, bao_up, dashboard):
    assert "cut" in notes, f"the first boot did not reach the cut (see vm-out-powercut/before): {notes}"
    volume = the_volume(notes["uuid"])
    volume.link_by_uuid()  # no udev in the guest
    assert reencrypting(volume), "the header records no re-encryption in progress: the cut did not land mid-way"
    secret_path = bao_up.store_passphrase(SUB, volume.uuid, PASSPHRASE.decode())
    with etc_luks(PERSIST / "luks"):
        try:
            reply = dashboard.open(bao_up.open_payload(secret_path))  # cryptsetup recovers the hotzone as it opens
            assert reply.state == "mounted", reply.response.text
            assert reference_sha256() == notes["reference_sha256"], "the data differs after the cut"

            done = subprocess.run([LUKSCTL, "--json", "reencrypt", "--pbkdf", "pbkdf2", "--iter-time", "1"], input=PASSPHRASE,
                                  capture_output=True, timeout=1800)
            assert done.returncode == 0, f"the re-run exited {done.returncode}: {done.stderr.decode(errors='replace')[-3000:]}"
            answer = json.loads(done.stdout.splitlines()[-1])
            assert answer["resumed"] is True and answer["online"] is True and "resumed the re-encryption" in answer["steps"], answer
            assert volume_key_digest(volume) != notes["volume_key_digest"] and not reencrypting(volume)
            assert reference_sha256() == notes["reference_sha256"], "the data differs after the resume"

            put_back_closed(volume)
            reply = dashboard.open(bao_up.open_payload(secret_path))
            assert reply.state == "mounted", reply.response.text
            assert reference_sha256() == notes["reference_sha256"], "the data differs after a close and the dashboard's open"
            assert subprocess.run([LUKSCTL, "header", "verify"], capture_output=True, timeout=300).returncode == 0
        finally:
            put_back_closed(volume)


def test_cut_at_every_step_of_setup_and_rotate_each_rerun_finishes_and_the_dashboard_opens(notes, bao_up, dashboard):
    assert "cut" in notes and notes["cut_points"] == [point.name for point in CUT_POINTS], notes
    rotate_token = token_file(bao_up, ROTATE_POLICY)
    lost = {}
    for point in CUT_POINTS:
        with etc_luks(point.directory / "luks"):
            try:
                run_again_and_open(point, bao_up, dashboard, rotate_token)
            except (AssertionError, pytest.fail.Exception) as failure:
                lost[point.name] = str(failure)
    assert not lost, "volumes lost:\n" + "\n".join(f"- {name}: {why}" for name, why in lost.items())


def run_again_and_open(point: CutPoint, vault, dashboard, rotate_token: str) -> None:
    """The same command again, which must resume (what the step had fsynced survived) and finish;
    then Vault's passphrase, and only it, opens the volume, the header backup matches, and the
    dashboard's open mounts it."""
    if point.command == "setup":
        # Vault was never reached: a new token, as the dashboard would give; otherwise none is needed.
        argv = setup_argv(point, vault.url, wrapping_token_file(point, vault) if point.tool is None else None)
    else:
        the_point_volume(point).link_by_uuid()
        argv = rotate_argv(point, vault.url, rotate_token)
    done = subprocess.run(argv, capture_output=True, env=SERVICE_ENV, timeout=600)
    assert done.returncode == 0, f"the re-run exited {done.returncode}: {done.stdout[-1500:]!r} {done.stderr[-1500:]!r}"
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["resumed"] is True, f"the re-run started over: what the step had written did not survive the cut: {answer}"

    in_vault = stored(vault, point.secret_path)
    assert opens(point.partition, in_vault), "the passphrase in Vault does not open the volume"
    if point.command == "rotate":
        assert not opens(point.partition, stored(vault, point.secret_path, version=1)), "the passphrase before the rotation still opens it"
    left = [path.name for path in (point.directory / "luks").iterdir() if path.name in UNFINISHED or path.name.startswith(".")]
    assert not left, f"the re-run left {left}"
    verify = subprocess.run([LUKSCTL, "header", "verify"], capture_output=True, env=SERVICE_ENV, timeout=300)
    assert verify.returncode == 0, f"header verify exited {verify.returncode}: {verify.stdout[-1000:]!r}"

    volume = the_point_volume(point)
    put_back_closed(volume)  # setup's re-run ends mounted
    volume.link_by_uuid()
    reply = dashboard.open(vault.open_payload(point.secret_path))
    assert reply.state == "mounted", f"the dashboard's open answered {reply.response.status_code} {reply.response.text}"
    put_back_closed(volume)


def the_point_volume(point: CutPoint) -> Volume:
    uuid = run(CRYPTSETUP, "luksUUID", point.partition).stdout.decode().strip()
    return Volume(b"", point.partition, point.partition, uuid=uuid, cryptdev=point.cryptdev)
