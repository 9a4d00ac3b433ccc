"""Shims: a stand-in for a tool where luksctl looks first on its fixed PATH (/usr/local/sbin),
which does what a test needs and then runs the real binary. VM only (the guest's /usr is a
throw-away overlay)."""

from __future__ import annotations

from pathlib import Path

SHIM_DIR = Path("/usr/local/sbin")


def install_shim(tool: str, script: str) -> Path:
    """Writes `script` (sh, after the #! line) as the shim for `tool`. Refuses to overwrite one:
    a shim another test left behind would hide this one, or be lost."""
    shim = SHIM_DIR / tool
    assert not shim.exists(), f"{shim} already exists"
    shim.write_text("#!/bin/sh\n" + script)
    shim.chmod(0o755)
    return shim


def remove_shim(tool: str) -> None:
    (SHIM_DIR / tool).unlink(missing_ok=True)
