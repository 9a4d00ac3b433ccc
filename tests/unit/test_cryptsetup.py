"""cryptsetup.py at the runner seam: exact argv and stdin bytes of every cryptsetup command."""

from __future__ import annotations

import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

from luksctl import runner
from luksctl.errors import CommandFailed, Refused, VolumeBusy, WrongPassphrase
from luksctl.root import cryptsetup, keys

DEVICE = "/dev/disk/by-uuid/0b2e6f5e-4a1c-4f4e-9a57-3c8d2b1e7f10"
STORED = b"stored\nwith a newline \xc3\xbc"


class Recorder:
    def __init__(self, returncode: int = 0, stdout: str = "") -> None:
        self.calls: list[tuple[list[str], bytes | None]] = []
        self.returncode, self.stdout = returncode, stdout

    def run(self, argv, *, timeout, stdin=None, check=True):
        assert timeout > 0
        self.calls.append((list(argv), stdin))
        return runner.Result(list(argv), self.returncode, self.stdout, "")


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

    with pytest.raises(WrongPassphrase):
        cryptsetup.add_key(DEVICE, b"wrong", b"new-key", 1, cryptsetup.Pbkdf())


def test_a_new_key_with_a_newline_is_never_sent(recorder):
    with pytest.raises(ValueError):
        cryptsetup.add_key(DEVICE, STORED, b"new\nkey", 1, cryptsetup.Pbkdf())
    assert recorder.calls == []


def test_opening_slot_reads_cryptsetups_verbose_answer(recorder):
    recorder.stdout = "No usable token is available.\nKey slot 4 unlocked.\nCommand successful.\n"

    assert cryptsetup.opening_slot(DEVICE, STORED, slot=4) == 4
    assert recorder.calls == [(["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-slot", "4", "--key-file=-", DEVICE], STORED)]


def test_opening_slot_none_for_a_wrong_passphrase(recorder):
    recorder.returncode = 2

    assert cryptsetup.opening_slot(DEVICE, b"wrong") is None


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
