"""FailedOpenLimiter's sqlite file: in a directory private to the service user, made by us, never
through a symlink (a planted database could carry triggers that run in every worker)."""

from __future__ import annotations

import stat

import pytest

from luksctl.api.ratelimit import FailedOpenLimiter
from luksctl.errors import ConfigError


def test_the_database_is_made_private_and_counts(tmp_path):
    limiter = FailedOpenLimiter(tmp_path / "failed-opens.sqlite", 5, 300)
    limiter.admit("192.0.2.1")

    assert stat.S_IMODE((tmp_path / "failed-opens.sqlite").stat().st_mode) == 0o600


def test_a_shared_directory_is_refused(tmp_path):
    tmp_path.chmod(0o1777)

    with pytest.raises(ConfigError, match="writable by nobody else"):
        FailedOpenLimiter(tmp_path / "failed-opens.sqlite", 5, 300)


def test_a_symlink_at_the_database_is_refused_and_not_followed(tmp_path):
    planted = tmp_path / "planted.sqlite"
    (tmp_path / "failed-opens.sqlite").symlink_to(planted)

    with pytest.raises(ConfigError, match="not a file of the service user"):
        FailedOpenLimiter(tmp_path / "failed-opens.sqlite", 5, 300)
    assert not planted.exists()
