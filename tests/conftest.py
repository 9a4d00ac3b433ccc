"""Shared by the host layers: `lab`, a real LUKS2 header on an image file (luks_lab.py)."""

from __future__ import annotations

import pytest

from luks_lab import Lab


@pytest.fixture
def lab(tmp_path, monkeypatch) -> Lab:
    return Lab(tmp_path, monkeypatch)
