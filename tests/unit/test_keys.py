"""keys.py at the runner seam: exact argv and stdin bytes of every keyslot command."""

from __future__ import annotations

import pytest

from luksctl import runner
from luksctl.errors import CommandFailed, Refused, WrongPassphrase
from luksctl.root import keys

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
    keys.add_key(DEVICE, STORED, b"new-key", 3, keys.Pbkdf("pbkdf2", 10))

    assert recorder.calls == [(
        ["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(STORED)}", "--key-slot", "3",
         "--pbkdf", "pbkdf2", "--iter-time", "10", DEVICE],
        STORED + b"new-key\n",
    )]


def test_add_key_with_cryptsetups_defaults_names_no_pbkdf(recorder):
    keys.add_key(DEVICE, STORED, b"new-key", 1, keys.Pbkdf())

    assert recorder.calls[0][0] == ["cryptsetup", "luksAddKey", "--key-file=-", f"--keyfile-size={len(STORED)}", "--key-slot", "1", DEVICE]


def test_add_key_wrong_passphrase(recorder):
    recorder.returncode = 2

    with pytest.raises(WrongPassphrase):
        keys.add_key(DEVICE, b"wrong", b"new-key", 1, keys.Pbkdf())


def test_a_new_key_with_a_newline_is_never_sent(recorder):
    with pytest.raises(ValueError):
        keys.add_key(DEVICE, STORED, b"new\nkey", 1, keys.Pbkdf())
    assert recorder.calls == []


def test_opening_slot_reads_cryptsetups_verbose_answer(recorder):
    recorder.stdout = "No usable token is available.\nKey slot 4 unlocked.\nCommand successful.\n"

    assert keys.opening_slot(DEVICE, STORED, slot=4) == 4
    assert recorder.calls == [(["cryptsetup", "open", "--test-passphrase", "--verbose", "--key-slot", "4", "--key-file=-", DEVICE], STORED)]


def test_opening_slot_none_for_a_wrong_passphrase(recorder):
    recorder.returncode = 2

    assert keys.opening_slot(DEVICE, b"wrong") is None


def test_opening_slot_other_failures_raise(recorder):
    recorder.returncode = 1

    with pytest.raises(CommandFailed):
        keys.opening_slot(DEVICE, STORED)


def test_kill_slot_needs_a_passphrase_of_another_slot_on_stdin(recorder):
    keys.kill_slot(DEVICE, 2, STORED)

    assert recorder.calls == [(["cryptsetup", "luksKillSlot", "--key-file=-", DEVICE, "2"], STORED)]


def test_kill_slot_refused_when_no_other_slot_opens(recorder):
    recorder.returncode = 2

    with pytest.raises(Refused, match="slot 2 was kept"):
        keys.kill_slot(DEVICE, 2, STORED)


def test_recovery_label_is_a_luks2_token_on_stdin(recorder):
    keys.label_recovery_slot(DEVICE, 5)

    assert recorder.calls == [(["cryptsetup", "token", "import", "--json-file=-", DEVICE], b'{"type": "luksctl-recovery", "keyslots": ["5"]}')]


def test_recovery_keys_are_fresh_and_high_entropy():
    made = {keys.new_recovery_key() for _ in range(50)}

    assert len(made) == 50
    for key in made:
        groups = key.decode().split("-")
        assert len(groups) == 8 and all(len(g) == 6 and set(g) <= set(keys.RECOVERY_ALPHABET) for g in groups)
