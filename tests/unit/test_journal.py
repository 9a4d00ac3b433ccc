"""journal.py: what an unfinished setup's state says when its passphrase file is gone."""

from __future__ import annotations

import json

import pytest

from luksctl.errors import SetupConflict
from luksctl.root import journal


def saved_state(directory, steps: list[str]) -> journal.Journal:
    setup = journal.Journal(directory)
    setup.store.write(journal.STATE_FILE, json.dumps({"device": "/dev/vdb", "steps": steps}).encode())
    return setup


def test_a_state_without_its_passphrase_names_the_steps_done_and_stays(tmp_path):
    setup = saved_state(tmp_path, [journal.VAULT_WRITE_STARTED, journal.VAULT_WRITTEN])

    with pytest.raises(SetupConflict, match=rf"\(vault-write-started, vault-written\) but {tmp_path / journal.PASSPHRASE_FILE} is gone; restore"):
        setup.load()
    assert (tmp_path / journal.STATE_FILE).exists()


@pytest.mark.parametrize("steps", [[], [journal.FORMATTED, journal.MKFS_DONE]])
def test_a_state_without_its_passphrase_before_any_step_or_after_the_last_is_removed(tmp_path, steps):
    setup = saved_state(tmp_path, steps)

    assert setup.load() is None
    assert not (tmp_path / journal.STATE_FILE).exists()


@pytest.mark.parametrize("text", [b'{"device": "/dev/vdb"}', b'["formatted"]', b"{"])
def test_a_damaged_state_is_refused(tmp_path, text):
    setup = journal.Journal(tmp_path)
    setup.store.write(journal.STATE_FILE, text)

    with pytest.raises(SetupConflict, match=f"^{tmp_path / journal.STATE_FILE} is damaged; compare it with the device, then move it away$"):
        setup.load()


def test_no_step_is_done_before_begin_nor_after_finish_and_finish_leaves_nothing(tmp_path):
    setup = journal.Journal(tmp_path)
    assert not setup.done(journal.FORMATTED)
    setup.begin(b"passphrase", {"device": "/dev/vdb"})
    setup.record(journal.FORMATTED)

    setup.finish()

    assert not setup.done(journal.FORMATTED)
    assert list(tmp_path.iterdir()) == [] and journal.Journal(tmp_path).load() is None
