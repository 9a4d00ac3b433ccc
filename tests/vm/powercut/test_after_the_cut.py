"""Boot 2 of the power-cut pair (scripts/vm-powercut.sh): the first boot was hard-reset (sysrq b,
no sync) in the middle of an online `luksctl reencrypt`. Here, on the same persistent disk: the
dashboard's open with the passphrase in Vault, then the same command again, which resumes from
cryptsetup's resilience data; the data byte-exact before and after, the volume key new."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
from helpers_vm import MOUNTPOINT, put_back_closed, reencrypting, volume_key_digest
from persistent_disk import NOTES, PASSPHRASE, mount_persistent_etc_luks, the_volume, unmount_persistent_etc_luks

LUKSCTL = "/usr/local/sbin/luksctl"
SUB = "powercut-user-sub"


@pytest.fixture(scope="module")
def notes():
    """/etc/luks and the notes as the cut left them on the persistent disk (mounted before the API starts)."""
    mount_persistent_etc_luks()
    try:
        yield json.loads(NOTES.read_text())
    finally:
        unmount_persistent_etc_luks()


def reference_sha256() -> str:
    return hashlib.sha256((MOUNTPOINT / "reference.bin").read_bytes()).hexdigest()


def test_cut_mid_reencryption_then_the_dashboard_opens_and_a_rerun_resumes_byte_exact(notes, bao_up, dashboard):
    assert "cut" in notes, f"the first boot did not reach the cut (see vm-out-powercut/before): {notes}"
    volume = the_volume(notes["uuid"])
    volume.link_by_uuid()  # no udev in the guest
    assert reencrypting(volume), "the header records no re-encryption in progress: the cut did not land mid-way"
    secret_path = bao_up.store_passphrase(SUB, volume.uuid, PASSPHRASE.decode())
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
