"""The tests' own layout: helpers live in helper modules (tests/support, *_fakes, conftest),
never in a test module that another test module imports."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from luks_lab import LUKS_LAB_PASSPHRASE, Lab
from support import shim
from support.proc import descends_from, processes
from support.secret_file import write_secret_file
from support.waiting import wait_until

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module name `path` imports, absolute or relative (`from .x import y` gives `x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                names.add(node.module)
            elif node.level:  # `from . import test_x`
                names.update(alias.name for alias in node.names)
    return names


def modules_importing_tests(tests: Path) -> list[tuple[str, str]]:
    return [
        (str(path.relative_to(tests)), name)
        for path in sorted(tests.rglob("*.py"))
        for name in sorted(imported_modules(path))
        if name.rpartition(".")[2].startswith("test_")
    ]


def test_no_module_imports_a_test_module():
    assert modules_importing_tests(TESTS) == []


def test_the_check_sees_a_test_module_imported(tmp_path):
    (tmp_path / "test_a.py").write_text("from test_b import helper\nfrom .test_c import x\nfrom . import test_d\nimport tests.vault.test_e\n")
    (tmp_path / "helpers.py").write_text("from support.waiting import wait_until\nimport json\n")

    assert modules_importing_tests(tmp_path) == [
        ("test_a.py", "test_b"), ("test_a.py", "test_c"), ("test_a.py", "test_d"), ("test_a.py", "tests.vault.test_e"),
    ]


# The shared helpers the VM tests use, checked here where they can run.


def test_a_shim_never_replaces_another(tmp_path, monkeypatch):
    monkeypatch.setattr(shim, "SHIM_DIR", tmp_path)
    first = shim.install_shim("cryptsetup", 'exec /sbin/cryptsetup "$@"\n')
    assert first.read_text() == '#!/bin/sh\nexec /sbin/cryptsetup "$@"\n' and first.stat().st_mode & 0o777 == 0o755

    with pytest.raises(AssertionError, match="already exists"):
        shim.install_shim("cryptsetup", "exit 1\n")
    assert "exit 1" not in first.read_text()
    shim.remove_shim("cryptsetup")
    assert not first.exists()


def test_the_process_snapshot_sees_a_running_child_its_argv_and_its_parent():
    argv = [sys.executable, "-c", "import time; time.sleep(30)", f"marker-{os.getpid()}-{time.monotonic_ns()}"]
    child = subprocess.Popen(argv)
    try:
        # Until its exec is done the child shows its parent's argv.
        wait_until(lambda: child.pid in processes() and processes()[child.pid].argv == [os.fsencode(arg) for arg in argv],
                   10, "the child's argv in the snapshot", interval=0.05)
        table = processes()
        assert table[child.pid].pgrp == os.getpgrp()
        assert descends_from(child.pid, os.getpid(), table) and table[child.pid].state in ("S", "R", "D")
    finally:
        child.kill()
        child.wait()


def test_wait_until_gives_up_at_its_bound():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="nothing: not ready after 0.2 s"):
        wait_until(lambda: False, 0.2, "nothing", interval=0.05)
    assert time.monotonic() - started < 2


def test_lab_opens_says_no_only_for_a_wrong_passphrase_and_raises_on_any_other_failure(lab):
    assert Lab.opens(lab.image, LUKS_LAB_PASSPHRASE) is True
    assert Lab.opens(lab.image, b"not the passphrase") is False
    with pytest.raises(RuntimeError, match="exit"):
        Lab.opens(lab.dir / "no-such-image", LUKS_LAB_PASSPHRASE)  # exit 4: not "does not open"


def test_lab_opens_says_no_for_a_header_without_keyslots(lab):
    subprocess.run(["cryptsetup", "luksErase", "--batch-mode", str(lab.image)], check=True, capture_output=True)

    assert Lab.opens(lab.image, LUKS_LAB_PASSPHRASE) is False


def test_a_secret_file_is_created_owner_only_and_replaces_what_was_there(tmp_path):
    path = tmp_path / "token"
    path.write_text("an older token\n")
    path.chmod(0o644)

    assert write_secret_file(path, "s.abc") == str(path)

    assert path.read_text() == "s.abc\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
