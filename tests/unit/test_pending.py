"""pending.py: what the store of pending passphrases refuses to read, and what it creates."""

from __future__ import annotations

import os
import stat

import pytest

from luksctl.errors import Refused, SetupConflict
from luksctl.root import pending
from luksctl.root.pending import OLD_ROTATE_PASSPHRASE, OLD_ROTATE_STATE, ROTATION, SETUP_PASSPHRASE, PendingStore
from luksctl.root.rotate import Pending

NOBODY = 65534


def test_a_symlink_is_refused_even_to_a_file_private_to_root(tmp_path):
    # Following it would hand rotate any root-private file as its passphrase (O_NOFOLLOW).
    target = tmp_path / "elsewhere"
    target.write_bytes(b"root's other secret")
    target.chmod(0o600)
    store = PendingStore(tmp_path, "rotate")
    store.path(ROTATION).symlink_to(target)

    with pytest.raises(Refused, match=f"^{store.path(ROTATION)} cannot be read safely: .*; move it away$"):
        store.read(ROTATION)


def test_a_file_private_to_another_user_is_refused(tmp_path):
    store = PendingStore(tmp_path, "setup")
    store.path(SETUP_PASSPHRASE).write_bytes(b"planted")
    store.path(SETUP_PASSPHRASE).chmod(0o600)
    os.chown(store.path(SETUP_PASSPHRASE), NOBODY, NOBODY)

    with pytest.raises(SetupConflict, match=f"it is 600, uid {NOBODY}$"):
        store.read(SETUP_PASSPHRASE)


def test_something_other_than_a_file_is_refused(tmp_path):
    store = PendingStore(tmp_path, "rotate")
    store.path(ROTATION).mkdir(mode=0o700)

    with pytest.raises(Refused, match="must be a file private to root"):
        store.read(ROTATION)


def test_write_makes_a_missing_directory_as_install_sh_does_and_its_file_private(tmp_path):
    """The directory is the ini's (/etc/luks): made 0700, the ini setup writes into it later could not be read by the API user."""
    store = PendingStore(tmp_path / "etc" / "luks", "rotate")
    umask = os.umask(0o077)  # a hardened root's
    try:
        store.write(ROTATION, b"{}")
    finally:
        os.umask(umask)

    assert stat.S_IMODE((tmp_path / "etc" / "luks").stat().st_mode) == 0o755
    assert stat.S_IMODE(store.path(ROTATION).stat().st_mode) == 0o600
    assert store.read(ROTATION) == b"{}"


def test_write_leaves_an_existing_directorys_mode_alone(tmp_path):
    (tmp_path / "luks").mkdir(mode=0o750)
    PendingStore(tmp_path / "luks", "rotate").write(ROTATION, b"{}")
    assert stat.S_IMODE((tmp_path / "luks").stat().st_mode) == 0o750


def test_unfinished_names_every_file_of_an_operation(tmp_path):
    store = PendingStore(tmp_path, "rotate")
    store.write(ROTATION, b"{}")
    leftover = tmp_path / f".{ROTATION}.0123abcd.tmp"
    leftover.write_bytes(b"{}")

    assert pending.describe(pending.unfinished(tmp_path)) == [f"rotate ({store.path(ROTATION)}, {leftover}); run luksctl rotate again"]


def test_rotate_saving_the_one_file_form_removes_both_files_of_the_old_form(tmp_path):
    store = PendingStore(tmp_path, "rotate")
    store.write(OLD_ROTATE_PASSPHRASE, b"new")
    store.write(OLD_ROTATE_STATE, b'{"old_slot": 0, "new_slot": 1}')

    Pending(tmp_path).save(b"new", {"old_slot": 0, "new_slot": 1})

    assert [path.name for path in tmp_path.iterdir()] == [ROTATION]
    assert Pending(tmp_path).load() == (b"new", {"old_slot": 0, "new_slot": 1})


@pytest.mark.parametrize("text", [b"{", b'{"old_slot": 0, "new_slot": 1}', b'["passphrase"]'])
def test_rotate_refuses_a_damaged_pending_rotation(tmp_path, text):
    PendingStore(tmp_path, "rotate").write(ROTATION, text)

    with pytest.raises(Refused, match=f"^{tmp_path / ROTATION} is damaged; compare it with the device, then move it away$"):
        Pending(tmp_path).load()
