"""cryptsetup.py at the runner seam: exact argv and stdin bytes of every cryptsetup command."""

from __future__ import annotations

import json
import subprocess
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest
from luks_lab import LUKS_LAB_FAST, Lab

from luksctl import runner
from luksctl.errors import CommandFailed, Refused, VolumeBusy, WrongPassphrase
from luksctl.root import cryptsetup, keys

DEVICE = "/dev/disk/by-uuid/0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10"
STORED = b"stored\nwith a newline \xc3\xbc"


class Recorder:
    def __init__(self, returncode: int = 0, stdout: str = "", stderr: str = "") -> None:
        self.calls: list[tuple[list[str], bytes | None]] = []
        self.timeouts: list[float] = []
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def run(self, argv, *, timeout, stdin=None, check=True):
        assert timeout > 0
        self.calls.append((list(argv), stdin))
        self.timeouts.append(timeout)
        return runner.Result(list(argv), self.returncode, self.stdout, self.stderr)


@pytest.fixture
def recorder(monkeypatch):
    fake = Recorder()
    monkeypatch.setattr(runner, "run", fake.run)
    return fake


def test_add_key_sends_the_authorising_passphrase_sized_then_the_new_key_to_a_newline(recorder):
    cryptsetup.add_key(DEVICE, STORED, b"new-key", 3, cryptsetup.Pbkdf("pbkdf2", 10))

    assert recorder.calls == [(
        ["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(STORED)}", "--key-slot", "3",
         "--pbkdf", "pbkdf2", "--iter-time", "10", DEVICE],
        STORED + b"new-key\n",
    )]


def test_add_key_with_cryptsetups_defaults_names_no_pbkdf(recorder):
    cryptsetup.add_key(DEVICE, STORED, b"new-key", 1, cryptsetup.Pbkdf())

    assert recorder.calls[0][0] == ["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(STORED)}", "--key-slot", "1", DEVICE]


def test_add_key_wrong_passphrase(recorder):
    recorder.returncode = 2

    with pytest.raises(WrongPassphrase, match=f"^the passphrase given does not open {DEVICE}; nothing was changed$"):
        cryptsetup.add_key(DEVICE, b"wrong", b"new-key", 1, cryptsetup.Pbkdf())


def test_a_new_key_with_a_newline_is_never_sent(recorder):
    with pytest.raises(ValueError, match="^a new key must not contain a newline$"):
        cryptsetup.add_key(DEVICE, STORED, b"new\nkey", 1, cryptsetup.Pbkdf())
    assert recorder.calls == []


def test_opening_slot_reads_cryptsetups_verbose_answer(recorder):
    recorder.stdout = "No usable token is available.\nKey slot 4 unlocked.\nCommand successful.\n"

    assert cryptsetup.opening_slot(DEVICE, STORED, slot=4) == 4
    assert recorder.calls == [(["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-slot", "4", "--key-file=-", DEVICE], STORED)]


def test_opening_slot_none_for_a_wrong_passphrase(recorder):
    recorder.returncode = 2

    assert cryptsetup.opening_slot(DEVICE, b"wrong") is None


def test_opening_slot_refuses_an_answer_that_names_no_keyslot(recorder):
    """Exit 0 without "Key slot N unlocked" (another cryptsetup's wording): guessing a slot could
    kill the wrong one, so it is a failure that quotes cryptsetup."""
    recorder.stdout, recorder.stderr = "Command successful.\n", "No usable token is available.\n"

    with pytest.raises(CommandFailed) as failed:
        cryptsetup.opening_slot(DEVICE, STORED)

    assert failed.value.message == f"cryptsetup did not say which keyslot of {DEVICE} opened"
    assert (failed.value.argv, failed.value.returncode, failed.value.stderr) == (recorder.calls[0][0], 0, "No usable token is available.\n")


def test_opening_slot_other_failures_raise(recorder):
    recorder.returncode = 1

    with pytest.raises(CommandFailed):
        cryptsetup.opening_slot(DEVICE, STORED)


def test_kill_slot_needs_a_passphrase_of_another_slot_on_stdin(recorder):
    cryptsetup.kill_slot(DEVICE, 2, STORED)

    assert recorder.calls == [(["cryptsetup", "luksKillSlot", "--key-file=-", DEVICE, "2"], STORED)]


def test_kill_slot_refused_when_no_other_slot_opens(recorder):
    recorder.returncode = 2

    with pytest.raises(Refused, match="slot 2 was kept"):
        cryptsetup.kill_slot(DEVICE, 2, STORED)


@pytest.mark.parametrize("remaining", [b"", None])
def test_kill_slot_without_a_passphrase_runs_nothing(recorder, remaining):
    """cryptsetup 2.x's luksKillSlot reads an empty --key-file=- ("Nothing to read on input.") and
    kills the slot with exit 0, checking nothing: the check that another slot opens is ours here."""
    with pytest.raises(Refused, match="slot 2 was kept"):
        cryptsetup.kill_slot(DEVICE, 2, remaining)

    assert recorder.calls == []


def test_recovery_label_is_a_luks2_token_on_stdin(recorder):
    keys.label_recovery_slot(DEVICE, 5)

    assert recorder.calls == [(["cryptsetup", "token", "import", "--json-file=-", DEVICE], b'{"type": "luksctl-recovery", "keyslots": ["5"]}')]


def test_recovery_keys_are_fresh_and_high_entropy():
    made = {keys.new_recovery_key() for _ in range(50)}

    assert len(made) == 50
    for key in made:
        groups = key.decode().split("-")
        assert len(groups) == 8 and all(len(g) == 6 and set(g) <= set(keys.RECOVERY_ALPHABET) for g in groups)


def test_luks_format_sends_the_passphrase_on_stdin_only(recorder):
    spec = cryptsetup.Format("aes-xts-plain64", 512, "sha256", cryptsetup.Pbkdf("pbkdf2", None, 1000))

    cryptsetup.luks_format(DEVICE, STORED, spec)

    assert recorder.calls == [(
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64", "--key-size", "512",
         "--hash", "sha256", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", DEVICE],
        STORED,
    )]
    assert recorder.timeouts == [cryptsetup.FORMAT_TIMEOUT], "argon2id's benchmark and 1 GiB take minutes on a slow VM"


def test_open_with_a_wrong_passphrase_says_what_to_do(recorder):
    recorder.returncode = cryptsetup.NO_KEY

    with pytest.raises(WrongPassphrase, match=f"^the passphrase does not open {DEVICE}; ask Vault again$"):
        cryptsetup.open_mapper(DEVICE, "vol", STORED, on_wrong_key="ask Vault again")


def test_a_header_with_every_keyslot_used_has_no_free_one():
    used = {slot: cryptsetup.Keyslot(slot, "pbkdf2", {"iterations": 1000}) for slot in range(8)}

    with pytest.raises(Refused, match="^all 8 keyslots are in use; remove one first$"):
        cryptsetup.LuksHeader(1, "uuid", "aes-xts-plain64", 512, used, {}).free_slot()


def test_a_luks1_header_is_read_from_cryptsetups_text(tmp_path):
    """Real cryptsetup. LUKS1 has no JSON dump: luksctl refuses or reports these volumes from the text."""
    image = tmp_path / "luks1.img"
    uuid = Lab.format(image, STORED, "luks1", [*LUKS_LAB_FAST, "--cipher", "aes-xts-plain64", "--key-size", "512"])
    subprocess.run(["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(STORED)}", "--key-slot", "3", *LUKS_LAB_FAST,
                    "--batch-mode", str(image)], input=STORED + b"second\n", check=True, capture_output=True)

    header = cryptsetup.read_header(image)

    assert (header.version, header.uuid, header.cipher, header.key_size) == (1, uuid, "aes-xts-plain64", 512)
    assert header.keyslots == {slot: cryptsetup.Keyslot(slot, "pbkdf2", {"iterations": 1000}) for slot in (0, 3)}
    assert header.max_keyslots == 8


def test_an_argon2_keyslots_cost_is_read_from_the_luks2_metadata(tmp_path):
    """Real cryptsetup: argon2's time, memory (KiB) and threads, as `report` shows them."""
    image = tmp_path / "argon2.img"
    Lab.format(image, STORED, options=["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "64", "--pbkdf-parallel", "1"])

    keyslot = cryptsetup.read_header(image).keyslots[0]

    assert (keyslot.pbkdf, keyslot.cost) == ("argon2id", {"time": 4, "memory": 64, "cpus": 1})


def test_a_luks1_field_cryptsetup_leaves_out_reads_as_unknown(monkeypatch):
    """Older or newer cryptsetups word the dump differently: a missing field is empty (0 bits), never an error."""
    answers = iter([runner.Result([], 0, "f0e0-uuid\n", ""), runner.Result([], 1, "", "not LUKS2"),
                    runner.Result([], 0, "LUKS header information\nVersion:       \t1\nCipher name:   \taes\n", "")])
    monkeypatch.setattr(runner, "run", lambda argv, **kw: next(answers))

    header = cryptsetup.read_header(DEVICE)

    assert (header.version, header.uuid, header.cipher, header.key_size, header.keyslots) == (1, "f0e0-uuid", "aes", 0, {})


JSON_DUMP = runner.Result(["cryptsetup", "luksDump", "--dump-json-metadata", DEVICE], 1, "", "Unsupported LUKS version 3.")
NOT_LUKS = runner.Result(["cryptsetup", "luksDump", DEVICE], 1, "", "Device is not a valid LUKS device.")
NOT_LUKS1 = runner.Result(["cryptsetup", "luksDump", DEVICE], 0, "LUKS header information\nVersion:       \t3\n", "")


@pytest.mark.parametrize(("text_dump", "what", "shown"), [
    (NOT_LUKS, f"dump the header of {DEVICE}", NOT_LUKS),
    (NOT_LUKS1, f"dump the LUKS2 metadata of {DEVICE}", JSON_DUMP),  # the JSON dump's failure says why
], ids=["no dump at all", "neither LUKS2 JSON nor LUKS1 text"])
def test_a_header_neither_dump_reads_names_the_dump_that_failed(monkeypatch, text_dump, what, shown):
    answers = [runner.Result(["cryptsetup", "luksUUID", DEVICE], 0, "f0e0-uuid\n", ""), JSON_DUMP, text_dump]
    monkeypatch.setattr(runner, "run", lambda argv, **kw: answers.pop(0) if answers[0].argv == argv else pytest.fail(f"unexpected {argv}"))

    with pytest.raises(CommandFailed) as failed:
        cryptsetup.read_header(DEVICE)

    assert failed.value.message == f"cryptsetup could not {what}"
    assert (failed.value.argv, failed.value.returncode, failed.value.stderr) == (shown.argv, shown.returncode, shown.stderr)


def test_close_of_a_busy_mapper_is_volume_busy(recorder):
    recorder.returncode = cryptsetup.BUSY

    with pytest.raises(VolumeBusy, match="/dev/mapper/crypt is still in use"):
        cryptsetup.close_mapper("crypt")
    assert recorder.calls == [(["cryptsetup", "close", "crypt"], None)]


def test_erase_and_header_copies(recorder, tmp_path):
    cryptsetup.erase(DEVICE)
    cryptsetup.backup_header(DEVICE, tmp_path / "copy")
    cryptsetup.restore_header(DEVICE, tmp_path / "copy")

    assert [argv for argv, _ in recorder.calls] == [
        ["cryptsetup", "luksErase", "--batch-mode", DEVICE],
        ["cryptsetup", "luksHeaderBackup", DEVICE, "--header-backup-file", str(tmp_path / "copy")],
        ["cryptsetup", "luksHeaderRestore", DEVICE, "--header-backup-file", str(tmp_path / "copy"), "--batch-mode"],
    ]


def test_a_failed_header_command_names_what_failed(recorder):
    recorder.returncode = 1

    with pytest.raises(CommandFailed, match="cryptsetup could not erase the keyslots of"):
        cryptsetup.erase(DEVICE)


def string_literals(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type == tokenize.STRING:
                yield token.start[0], token.string


def test_no_module_but_cryptsetup_py_speaks_cryptsetup():
    """Its binary name and the PBKDF choices are in one module: a second copy would drift.
    ("argon2i" appears only in a list of choices; "argon2id" is also a default elsewhere.)"""
    package = Path(cryptsetup.__file__).parents[1]
    owner = Path(cryptsetup.__file__)
    found = [
        f"{path.relative_to(package)}:{line}: {text}"
        for path in sorted(package.rglob("*.py")) if path != owner
        for line, text in string_literals(path)
        if text.strip("'\"") in ("cryptsetup", "argon2i")
    ]

    assert found == []


class StreamingRecorder:
    """runner.run_streaming's seam: the argv and stdin of each `cryptsetup reencrypt`, and progress lines it prints."""

    def __init__(self, monkeypatch, returncode: int = 0, lines: tuple[str, ...] = (), stderr: str = "") -> None:
        self.calls: list[tuple[list[str], bytes]] = []
        self.returncode, self.lines, self.stderr = returncode, lines, stderr
        monkeypatch.setattr(runner, "run_streaming", self.run)
        monkeypatch.setattr(cryptsetup, "size_in_bytes", lambda device: 64 << 30)

    def run(self, argv, *, timeout, stdin, on_line):
        assert timeout >= 64 << 30 >> 20, "a deadline that grows with the device"
        self.calls.append((list(argv), stdin))
        if on_line:  # else cryptsetup prints its lines (a bar) on our stdout, as runner.run_streaming does
            for line in self.lines:
                on_line(line)
        return runner.Result(list(argv), self.returncode, "", self.stderr)


ONLINE = cryptsetup.Reencryption(DEVICE, "crypt")


def test_reencryption_of_the_only_keyslot_sends_its_passphrase_as_a_key_file(monkeypatch):
    recorder = StreamingRecorder(monkeypatch)

    cryptsetup.start_reencryption(ONLINE, [STORED], keep_only_slot=None, cipher=None, key_size=None, pbkdf=cryptsetup.Pbkdf())

    assert recorder.calls == [(["cryptsetup", "reencrypt", "--batch-mode", "--key-file=-", "--active-name", "crypt"], STORED)]


def test_reencryption_keeping_every_keyslot_sends_one_passphrase_a_line_in_slot_order(monkeypatch):
    recorder = StreamingRecorder(monkeypatch)

    cryptsetup.start_reencryption(ONLINE, [b"slot 0", b"slot 1"], keep_only_slot=None, cipher="aes-xts-plain64", key_size=256,
                                  pbkdf=cryptsetup.Pbkdf("pbkdf2", 10))

    assert recorder.calls == [(["cryptsetup", "reencrypt", "--batch-mode", "--cipher", "aes-xts-plain64", "--key-size", "256",
                                "--pbkdf", "pbkdf2", "--iter-time", "10", "--active-name", "crypt"], b"slot 0\nslot 1\n")]
    with pytest.raises(ValueError, match="^passphrases sent one a line must not contain a newline$"):
        cryptsetup.start_reencryption(ONLINE, [STORED, b"recovery"], keep_only_slot=None, cipher=None, key_size=None, pbkdf=cryptsetup.Pbkdf())


def test_reencryption_keeping_one_keyslot_names_it(monkeypatch):
    recorder = StreamingRecorder(monkeypatch)

    cryptsetup.start_reencryption(ONLINE, [STORED], keep_only_slot=3, cipher=None, key_size=None, pbkdf=cryptsetup.Pbkdf())

    assert recorder.calls[0][0] == ["cryptsetup", "reencrypt", "--batch-mode", "--key-slot", "3", "--key-file=-", "--active-name", "crypt"]


def test_resumed_offline_reencryption_of_a_block_device_leaves_the_check_for_a_mapping_to_cryptsetup(monkeypatch):
    recorder = StreamingRecorder(monkeypatch, lines=("Some message", '{"device_bytes":"1","device_size":"2"}'))
    progress = []

    cryptsetup.resume_reencryption(cryptsetup.Reencryption("/dev/loop0", None, progress.append), STORED)

    assert recorder.calls == [(["cryptsetup", "reencrypt", "--batch-mode", "--resume-only", "--key-file=-", "--progress-json", "/dev/loop0"], STORED)]
    assert progress == [{"device_bytes": "1", "device_size": "2"}]


def test_reencryption_without_a_listener_leaves_cryptsetups_lines_to_the_terminal(monkeypatch):
    recorder = StreamingRecorder(monkeypatch, lines=('{"device_bytes":"1","device_size":"2"}',))

    cryptsetup.start_reencryption(cryptsetup.Reencryption(DEVICE, "crypt"), [STORED], keep_only_slot=None, cipher=None,
                                  key_size=None, pbkdf=cryptsetup.Pbkdf())

    assert "--progress-json" not in recorder.calls[0][0]


@pytest.mark.parametrize(("call", "what"), [
    (lambda: cryptsetup.start_reencryption(ONLINE, [STORED], keep_only_slot=None, cipher=None, key_size=None, pbkdf=cryptsetup.Pbkdf()),
     f"re-encrypt {DEVICE}"),
    (lambda: cryptsetup.resume_reencryption(ONLINE, STORED), f"resume the re-encryption of {DEVICE}"),
], ids=["start", "resume"])
def test_a_failed_reencryption_says_what_could_not_be_done_with_cryptsetups_words(monkeypatch, call, what):
    recorder = StreamingRecorder(monkeypatch, returncode=1, stderr="Device crypt is not active.")

    with pytest.raises(CommandFailed) as failed:
        call()

    assert failed.value.message == f"cryptsetup could not {what}"
    assert (failed.value.argv, failed.value.returncode, failed.value.stderr) == (recorder.calls[0][0], 1, "Device crypt is not active.")


def test_reencryption_with_a_wrong_passphrase(monkeypatch):
    StreamingRecorder(monkeypatch, returncode=cryptsetup.NO_KEY)

    with pytest.raises(WrongPassphrase, match=f"^the passphrase given does not open {DEVICE}; nothing was changed$"):
        cryptsetup.resume_reencryption(ONLINE, b"wrong")


def test_a_started_reencryption_is_read_from_the_luks2_requirements(recorder):
    metadata = {"keyslots": {"0": {"type": "luks2", "key_size": 64, "kdf": {"type": "pbkdf2", "iterations": 1000, "salt": "s"}},
                             "1": {"type": "reencrypt", "key_size": 1, "mode": "reencrypt"}},
                "segments": {"0": {"encryption": "aes-xts-plain64"}},
                "digests": {"0": {"segments": ["0"], "digest": "old"}, "1": {"segments": ["2"], "digest": "new"}},
                "config": {"requirements": {"mandatory": ["online-reencrypt-v2"]}}}
    recorder.stdout = json.dumps(metadata)

    header = cryptsetup.read_header(DEVICE)

    assert header.reencrypting is True and list(header.keyslots) == [0] and header.key_size == 512
    assert header.volume_key_digest == "old"


@pytest.mark.parametrize("digests", [None, {"0": {"digest": "of no segment"}}], ids=["no digests", "a digest naming no segment"])
def test_luks2_fields_the_metadata_leaves_out_read_as_unknown(recorder, digests):
    """No passphrase keyslot, no data segment, a token and a digest naming nothing: reported, never an error."""
    metadata = {"keyslots": {"1": {"type": "reencrypt", "key_size": 1}}, "segments": {}, "tokens": {"2": {"type": cryptsetup.RECOVERY_TOKEN}}}
    recorder.stdout = json.dumps(metadata if digests is None else {**metadata, "digests": digests})

    header = cryptsetup.read_header(DEVICE)

    assert (header.cipher, header.key_size, header.keyslots, header.recovery_tokens) == ("unknown", 0, {}, {2: []})
    assert (header.reencrypting, header.volume_key_digest) == (False, "")


BACKUP = cryptsetup.DEFAULT_HEADER_BACKUP


@pytest.mark.parametrize(("call", "what"), [
    (lambda: cryptsetup.luks_format(DEVICE, STORED, cryptsetup.Format("aes-xts-plain64", 512, "sha256", cryptsetup.Pbkdf())),
     f"format {DEVICE}"),
    (lambda: cryptsetup.open_mapper(DEVICE, "vol", STORED, on_wrong_key="ask again"), f"open {DEVICE}"),
    (lambda: cryptsetup.close_mapper("vol"), "close vol"),
    (lambda: cryptsetup.opens(DEVICE, STORED), f"test a passphrase on {DEVICE}"),
    (lambda: cryptsetup.kill_slot(DEVICE, 1, STORED), f"remove keyslot 1 of {DEVICE}"),
    (lambda: cryptsetup.add_key(DEVICE, STORED, b"new-key", 1, cryptsetup.Pbkdf()), f"add a key to slot 1 of {DEVICE}"),
    (lambda: cryptsetup.import_token(DEVICE, {"type": cryptsetup.RECOVERY_TOKEN}), f"label a keyslot of {DEVICE}"),
    (lambda: cryptsetup.remove_token(DEVICE, 3), f"remove token 3 of {DEVICE}"),
    (lambda: cryptsetup.erase(DEVICE), f"erase the keyslots of {DEVICE}"),
    (lambda: cryptsetup.luks_uuid(DEVICE), f"read the LUKS uuid of {DEVICE}"),
    (lambda: cryptsetup.backup_header(DEVICE, BACKUP), f"back up the header of {DEVICE}"),
    (lambda: cryptsetup.restore_header(DEVICE, BACKUP), f"restore the header of {DEVICE}"),
], ids=["luksFormat", "open", "close", "test-passphrase", "luksKillSlot", "luksAddKey", "token import", "token remove",
        "luksErase", "luksUUID", "luksHeaderBackup", "luksHeaderRestore"])
def test_any_other_failure_says_what_could_not_be_done_with_cryptsetups_argv_exit_code_and_stderr(recorder, call, what):
    """Not a wrong passphrase (2) nor busy (5): the operator gets cryptsetup's own words."""
    recorder.returncode, recorder.stderr = 1, "Device vol is not active."

    with pytest.raises(CommandFailed) as failed:
        call()

    assert failed.value.message == f"cryptsetup could not {what}"
    assert (failed.value.argv, failed.value.returncode, failed.value.stderr) == (recorder.calls[0][0], 1, "Device vol is not active.")
