"""`luksctl reencrypt` through main(), with the real cryptsetup re-encrypting image files offline.

cryptsetup 2.6 re-encrypts a LUKS2 image file without device-mapper when told it is offline, so
these run the real re-encryption; an interruption is the real resilience state a started
re-encryption leaves (`--init-only`: a kill before the first block). The online run (through the
open mapping) needs a kernel: its argv is checked here at the runner seam, the run itself in
tests/vm/test_reencrypt.py.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from lock_holder import lock_held_elsewhere
from luks_lab import LUKS_LAB_FAST as FAST
from luks_lab import LUKS_LAB_FAST_NEW_SLOT as FAST_NEW_SLOT
from luks_lab import LUKS_LAB_PASSPHRASE as PASSPHRASE
from luks_lab import Lab

from luksctl import runner
from luksctl.errors import EXIT_BUSY, EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_WRONG_PASSPHRASE
from luksctl.root import cli, cryptsetup, header, pending, reencrypt
from luksctl.root.cli import main
from luksctl.status import VolumeStatus

opens = Lab.opens
DATA_OFFSET = 16 * 1024 * 1024  # luksFormat's default LUKS2 header area on these images


def run_json(lab: Lab, capsys, *argv: str, stdin: bytes = PASSPHRASE) -> tuple[int, list[dict]]:
    """`luksctl --json ARGV`: its exit code and every JSON line (progress events, then the answer)."""
    capsys.readouterr()
    code = main(["--json", *argv], paths=lab.paths, stdin=io.BytesIO(stdin), stdin_is_tty=False)
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def volume_key(image: Path, passphrase: bytes, target: Path) -> Path:
    """The volume key, as `dmsetup table --showkeys` would have shown it to an administrator."""
    subprocess.run(["cryptsetup", "luksDump", "--dump-volume-key", "--volume-key-file", str(target), "--batch-mode", "--key-file=-", str(image)],
                   input=passphrase, check=True, capture_output=True)
    return target


def volume_key_fits(image: Path, key: Path) -> bool:
    result = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--volume-key-file", str(key), str(image)], capture_output=True)
    assert result.returncode in (0, 2), result.stderr
    return result.returncode == 0


def ciphertext(image: Path) -> bytes:
    with image.open("rb") as stream:
        stream.seek(DATA_OFFSET)
        return stream.read()


def add_recovery_key(lab: Lab, capsys) -> dict:
    code, answer = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=PASSPHRASE)
    assert code == EXIT_OK
    return answer


def interrupt_a_reencryption(image: Path) -> None:
    """What a kill leaves once cryptsetup has started: new keyslots and its resilience data in the header."""
    subprocess.run(["cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", "--batch-mode", "--key-slot", "0", "--key-file=-",
                    *FAST, str(image)], input=PASSPHRASE, check=True, capture_output=True)
    assert cryptsetup.read_header(str(image)).reencrypting


def test_reencrypt_gives_a_new_volume_key_rewrites_every_sector_and_the_header_backup(lab, capsys, tmp_path):
    lab.run(capsys, "header", "backup")
    old_backup, old_data = lab.backup.read_bytes(), ciphertext(lab.image)
    old_key = volume_key(lab.image, PASSPHRASE, tmp_path / "old-key")
    before = cryptsetup.read_header(str(lab.image))

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    answer = lines[-1]
    assert code == EXIT_OK, answer
    assert answer["reencrypted"] is True and answer["online"] is False and answer["resumed"] is False
    assert answer["steps"] == ["re-encrypted", "wrote header backup"]
    after = cryptsetup.read_header(str(lab.image))
    assert after.volume_key_digest != before.volume_key_digest and not after.reencrypting
    assert (after.cipher, after.key_size) == (before.cipher, before.key_size)
    assert not volume_key_fits(lab.image, old_key), "the key an administrator once saw no longer fits"
    assert opens(lab.image, PASSPHRASE)
    new_data = ciphertext(lab.image)
    assert all(new_data[at:at + 4096] != old_data[at:at + 4096] for at in range(0, len(old_data), 4096)), "every sector written again"
    assert lab.backup.read_bytes() != old_backup and answer["header_checksum"] == header.sha256_of(lab.backup)
    assert not (lab.dir / pending.REENCRYPTION).exists()


def test_reencrypt_with_json_reports_cryptsetups_progress_as_events(lab, capsys):
    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_OK
    events = lines[:-1]
    assert events and all(event["event"] == "reencrypt" for event in events)
    assert events[-1]["percent"] == 100 and events[-1]["bytes_done"] == events[-1]["bytes_total"] == 4 * 1024 * 1024


def test_reencrypt_takes_a_new_cipher_and_key_size(lab, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["reencrypt", "--cipher=--disable-locks"], paths=lab.paths, stdin=io.BytesIO(PASSPHRASE), stdin_is_tty=False)
    assert refused.value.code == EXIT_USAGE, "an option in disguise never reaches cryptsetup"

    code, lines = run_json(lab, capsys, "reencrypt", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", *FAST_NEW_SLOT)

    assert code == EXIT_OK, lines[-1]
    assert (lines[-1]["cipher"], lines[-1]["key_size"]) == ("aes-cbc-essiv:sha256", 256)
    assert cryptsetup.read_header(str(lab.image)).cipher == "aes-cbc-essiv:sha256"


def test_reencrypt_with_a_wrong_passphrase_changes_nothing(lab, capsys):
    before = cryptsetup.read_header(str(lab.image))

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT, stdin=b"not it")

    assert code == EXIT_WRONG_PASSPHRASE
    assert cryptsetup.read_header(str(lab.image)) == before


def test_reencrypt_refuses_luks1_and_says_how_to_convert(tmp_path, monkeypatch, capsys):
    lab = Lab(tmp_path, monkeypatch, "luks1")

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_REFUSED
    assert "LUKS1" in lines[-1]["error"] and "luksctl header backup" in lines[-1]["error"]
    assert f"cryptsetup convert --type luks2 {lab.image}" in lines[-1]["error"]


@pytest.mark.parametrize("operation", ["setup", "rotate"])
def test_reencrypt_refuses_while_a_setup_or_rotation_is_unfinished(lab, capsys, operation):
    store = pending.PendingStore(lab.dir, operation)
    store.write(store.names[0], b"pending passphrase")
    before = cryptsetup.read_header(str(lab.image))

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_REFUSED and f"run luksctl {operation} again" in lines[-1]["error"]
    assert cryptsetup.read_header(str(lab.image)) == before


def test_reencrypt_waits_for_the_volume_lock_and_gives_up_busy(lab, capsys, monkeypatch):
    """An open holds the lock: reencrypt waits as long as close would, then answers busy having changed nothing.
    (The same lock, held by reencrypt, is what an open waits for and answers busy on.)"""
    monkeypatch.setattr(cli, "LOCK_WAIT", 1)
    before = cryptsetup.read_header(str(lab.image))

    with lock_held_elsewhere(lab.paths.lock_file):
        code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_BUSY
    assert cryptsetup.read_header(str(lab.image)) == before


# --- other keyslots: the recovery key ---------------------------------------------------------


def test_reencrypt_refuses_to_drop_the_recovery_key_unasked(lab, capsys):
    recovery = add_recovery_key(lab, capsys)
    before = cryptsetup.read_header(str(lab.image))

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_REFUSED
    assert f"keyslots [{recovery['recovery_slot']}]" in lines[-1]["error"] and "the recovery key" in lines[-1]["error"]
    assert "--recovery-key-file" in lines[-1]["error"] and "--drop-other-keyslots" in lines[-1]["error"]
    assert cryptsetup.read_header(str(lab.image)) == before
    assert not (lab.dir / pending.REENCRYPTION).exists()


def test_reencrypt_keeps_the_recovery_key_given_and_its_label(lab, capsys, tmp_path):
    recovery = add_recovery_key(lab, capsys)
    key_file = tmp_path / "recovery-key"
    key_file.write_text(recovery["recovery_key"] + "\n")

    code, lines = run_json(lab, capsys, "reencrypt", "--recovery-key-file", str(key_file), *FAST_NEW_SLOT)

    assert code == EXIT_OK, lines[-1]
    after = cryptsetup.read_header(str(lab.image))
    assert len(after.keyslots) == 2
    assert cryptsetup.opening_slot(str(lab.image), recovery["recovery_key"].encode()) in after.recovery_slots
    assert cryptsetup.opening_slot(str(lab.image), PASSPHRASE) not in after.recovery_slots


def test_reencrypt_refuses_a_recovery_key_that_does_not_open_the_recovery_slot(lab, capsys, tmp_path):
    add_recovery_key(lab, capsys)
    key_file = tmp_path / "recovery-key"
    key_file.write_bytes(b"abcdef-ghjkmn-pqrstu-vwxyz2-345678-9abcde-fghjkm-npqrst")  # a recovery key, not this one

    code, lines = run_json(lab, capsys, "reencrypt", "--recovery-key-file", str(key_file), *FAST_NEW_SLOT)

    assert code == EXIT_WRONG_PASSPHRASE and "recovery keyslot" in lines[-1]["error"]


def test_reencrypt_drops_the_recovery_key_and_its_label_when_told(lab, capsys):
    recovery = add_recovery_key(lab, capsys)

    code, lines = run_json(lab, capsys, "reencrypt", "--drop-other-keyslots", *FAST_NEW_SLOT)

    assert code == EXIT_OK, lines[-1]
    assert "removed the label of the dropped recovery key" in lines[-1]["steps"]
    after = cryptsetup.read_header(str(lab.image))
    assert len(after.keyslots) == 1 and after.recovery_tokens == {}
    assert not opens(lab.image, recovery["recovery_key"].encode()) and opens(lab.image, PASSPHRASE)
    assert add_recovery_key(lab, capsys)["recovery_slot"] is not None, "a new recovery key can be issued"


def test_reencrypt_refuses_the_recovery_key_as_the_passphrase(lab, capsys):
    recovery = add_recovery_key(lab, capsys)

    code, lines = run_json(lab, capsys, "reencrypt", "--drop-other-keyslots", *FAST_NEW_SLOT, stdin=recovery["recovery_key"].encode())

    assert code == EXIT_REFUSED and "is the recovery key" in lines[-1]["error"]
    assert opens(lab.image, PASSPHRASE)


# --- interrupted runs ---------------------------------------------------------------------------


def test_a_rerun_resumes_the_reencryption_a_kill_left_and_report_shows_it_until_then(lab, capsys):
    interrupt_a_reencryption(lab.image)
    before = cryptsetup.read_header(str(lab.image))

    code, answer = lab.run(capsys, "report")
    assert code == EXIT_OK and answer["reencrypting"] is True
    main(["report"], paths=lab.paths, stdin=io.BytesIO(b""), stdin_is_tty=False)
    assert "RE-ENCRYPTING:    started and not finished" in capsys.readouterr().out

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_OK, lines[-1]
    assert lines[-1]["resumed"] is True and lines[-1]["steps"] == ["resumed the re-encryption", "wrote header backup"]
    after = cryptsetup.read_header(str(lab.image))
    assert not after.reencrypting and after.volume_key_digest != before.volume_key_digest
    assert opens(lab.image, PASSPHRASE)
    assert lab.run(capsys, "report")[1]["reencrypting"] is False


def test_a_rerun_after_cryptsetup_finished_writes_only_the_backup(lab, capsys, monkeypatch):
    """Killed between cryptsetup's end and the backup: the state file's digest is not the volume's any more."""
    write_backup = reencrypt.write_backup
    monkeypatch.setattr(reencrypt, "write_backup", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        main(["--json", "reencrypt", *FAST_NEW_SLOT], paths=lab.paths, stdin=io.BytesIO(PASSPHRASE), stdin_is_tty=False)
    monkeypatch.setattr(reencrypt, "write_backup", write_backup)
    digest = cryptsetup.read_header(str(lab.image)).volume_key_digest
    code, answer = lab.run(capsys, "report")
    assert "run luksctl reencrypt again" in answer["pending"][0]

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_OK, lines[-1]
    assert lines[-1]["steps"] == ["found the re-encryption finished", "wrote header backup"]
    assert cryptsetup.read_header(str(lab.image)).volume_key_digest == digest, "not re-encrypted twice"
    assert lab.run(capsys, "header", "verify")[0] == EXIT_OK
    assert not (lab.dir / pending.REENCRYPTION).exists()


# --- online, at the runner seam -----------------------------------------------------------------


def test_an_open_mapping_is_reencrypted_online_through_its_name(lab, capsys, monkeypatch):
    calls = []

    def cryptsetup_reencrypt(argv, *, timeout, stdin, on_line):
        calls.append((argv, stdin))
        return runner.Result(argv, 0, "", "")

    monkeypatch.setattr(runner, "run_streaming", cryptsetup_reencrypt)
    monkeypatch.setattr(reencrypt, "current_status", lambda volume: VolumeStatus("dm-0", True))

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_OK and lines[-1]["online"] is True
    assert calls == [(["cryptsetup", "reencrypt", "--batch-mode", "--key-file=-", *FAST_NEW_SLOT, "--progress-json", "--active-name", "labvol"],
                      PASSPHRASE)]


def test_keeping_the_recovery_key_refuses_a_stored_passphrase_with_a_newline(tmp_path, monkeypatch, capsys):
    lab = Lab(tmp_path, monkeypatch, passphrase=b"first line\nsecond line")
    code, recovery = lab.run(capsys, "recovery-key", "add", *FAST_NEW_SLOT, stdin=b"first line\nsecond line")
    assert code == EXIT_OK, recovery
    key_file = tmp_path / "recovery-key"
    key_file.write_text(recovery["recovery_key"])
    before = cryptsetup.read_header(str(lab.image))

    code, lines = run_json(lab, capsys, "reencrypt", "--recovery-key-file", str(key_file), *FAST_NEW_SLOT, stdin=b"first line\nsecond line")

    assert code == EXIT_REFUSED and "newline" in lines[-1]["error"] and "--drop-other-keyslots" in lines[-1]["error"]
    assert cryptsetup.read_header(str(lab.image)) == before


def test_a_killed_online_run_is_unmounted_recovered_by_an_open_mounted_and_resumed(lab, capsys, monkeypatch):
    """What a SIGKILLed online run leaves (the mapping pointing through its hotzone devices, one of them
    suspended) is put back before the resume: the suspended one's I/O failed (an error table, then
    resumed), unmounted, removed top-down, opened, mounted."""
    interrupt_a_reencryption(lab.image)
    calls = []
    left = {"labvol": "254:0", "labvol-hotzone-forward": "254:1", "labvol-overlay": "254:2"}
    monkeypatch.setattr(reencrypt, "find_mapper_device", left.get)
    monkeypatch.setattr(reencrypt, "_suspended", lambda name: name == "labvol-hotzone-forward")
    monkeypatch.setattr(reencrypt, "_sectors", {"labvol-hotzone-forward": 491520}.get)
    monkeypatch.setattr(reencrypt, "current_status", lambda volume: VolumeStatus("254:0", True))
    real_run = runner.run

    def dmsetup_recorded(argv, *, timeout, **kwargs):
        if argv[0] != "dmsetup":
            return real_run(argv, timeout=timeout, **kwargs)  # cryptsetup still reads the header
        calls.append(argv)
        return runner.Result(argv, 0, "", "")

    monkeypatch.setattr(runner, "run", dmsetup_recorded)
    monkeypatch.setattr(reencrypt, "umount", lambda volume: calls.append("umount"))
    monkeypatch.setattr(reencrypt, "luks_open", lambda volume, passphrase: calls.append(("open", passphrase)))
    monkeypatch.setattr(reencrypt, "mount", lambda volume, options: calls.append(("mount", options)))
    monkeypatch.setattr(runner, "run_streaming", lambda argv, *, stdin, **kwargs: calls.append((argv, stdin)) or runner.Result(argv, 0, "", ""))

    code, lines = run_json(lab, capsys, "reencrypt", *FAST_NEW_SLOT)

    assert code == EXIT_OK, lines[-1]
    assert calls == [["dmsetup", "load", "labvol-hotzone-forward", "--table", "0 491520 error"], ["dmsetup", "resume", "labvol-hotzone-forward"], "umount",
                     ["dmsetup", "remove", "labvol"], ["dmsetup", "remove", "labvol-overlay"], ["dmsetup", "remove", "labvol-hotzone-forward"],
                     ("open", PASSPHRASE), ("mount", "nosuid,nodev"),
                     (["cryptsetup", "reencrypt", "--batch-mode", "--resume-only", "--key-file=-", "--progress-json", "--active-name", "labvol"], PASSPHRASE)]
    assert lines[-1]["steps"][0] == "unmounted, recovered the killed run's hotzone and mounted again"
