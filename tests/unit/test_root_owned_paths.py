"""README, Files: luksctl refuses /etc/luks files a non-root user could replace, symlinks included."""

from __future__ import annotations

import os

import pytest

from luksctl.config import ensure_root_owned
from luksctl.errors import ConfigError

NOBODY = 65534


def test_a_symlink_to_a_root_owned_file_in_a_directory_another_user_owns_is_refused(tmp_path):
    luks = tmp_path / "luks"
    luks.mkdir(mode=0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    target = elsewhere / "luks-cryptdev.ini"
    target.write_text("[luks]\n")
    target.chmod(0o644)
    os.chown(elsewhere, NOBODY, NOBODY)  # nobody may swap the target for a file of its own
    link = luks / "luks-cryptdev.ini"
    link.symlink_to(target)

    with pytest.raises(ConfigError) as caught:
        ensure_root_owned(link)

    assert caught.value.message == f"{link} is a symbolic link; it must be a regular file owned by root"
