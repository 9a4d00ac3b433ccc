"""tests/run_policy.py, registered by tests/conftest.py for every run: a skip or an xfail the
allow-list does not name fails the run, and so does an xpass, which the JUnit XML then marks.
Each case is a real pytest run, in its own directory, on a small test file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def run_pytest(directory: Path, source: str, allowed_skips: dict[str, str]) -> subprocess.CompletedProcess:
    """pytest on test_cases.py (source) in directory, with the run policy and the given allow-list."""
    directory.mkdir(exist_ok=True)
    (directory / "pytest.ini").write_text("[pytest]\n")  # this directory is the rootdir, not the repository
    (directory / "conftest.py").write_text(
        "from run_policy import RunPolicy\n\n\n"
        "def pytest_configure(config):\n"
        f"    config.pluginmanager.register(RunPolicy({allowed_skips!r}), 'luksctl-run-policy')\n")
    (directory / "test_cases.py").write_text("import pytest\n\n\n" + textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--junitxml=junit.xml", "test_cases.py"],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=120)


SKIPS = """
    def test_runs():
        pass

    def test_skips():
        pytest.skip("no widget here")
"""


def test_a_skip_the_allow_list_does_not_name_fails_the_run_and_is_named(tmp_path):
    result = run_pytest(tmp_path, SKIPS, {})

    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "1 passed, 1 skipped" in result.stdout
    assert ("test_cases.py::test_skips: SKIPPED (no widget here), and ALLOWED_SKIPS in tests/conftest.py "
            "does not name it") in result.stdout


def test_a_skip_the_allow_list_names_passes(tmp_path):
    result = run_pytest(tmp_path, SKIPS, {"test_cases.py::test_skips": "no widget on this host"})

    assert result.returncode == pytest.ExitCode.OK, result.stdout
    assert "run policy" not in result.stdout


def test_a_skip_marker_and_a_module_that_skips_itself_fail_the_run_too(tmp_path):
    marked = run_pytest(tmp_path / "marked", """
        @pytest.mark.skipif(True, reason="never here")
        def test_marked():
            pass
    """, {})
    module = run_pytest(tmp_path / "module", """
        pytest.skip("not on this host", allow_module_level=True)

        def test_never_collected():
            pass
    """, {})

    assert marked.returncode == pytest.ExitCode.TESTS_FAILED, marked.stdout
    assert "test_cases.py::test_marked: SKIPPED (never here)" in marked.stdout
    assert module.returncode == pytest.ExitCode.TESTS_FAILED, module.stdout
    assert "test_cases.py: SKIPPED (not on this host)" in module.stdout


def test_an_xfail_fails_the_run_unless_named(tmp_path):
    source = """
        @pytest.mark.xfail(reason="known bug")
        def test_known_bug():
            assert False
    """
    refused = run_pytest(tmp_path, source, {})
    allowed = run_pytest(tmp_path, source, {"test_cases.py::test_known_bug": "known bug, issue 99"})

    assert refused.returncode == pytest.ExitCode.TESTS_FAILED, refused.stdout
    assert "test_cases.py::test_known_bug: XFAIL (known bug)" in refused.stdout
    assert allowed.returncode == pytest.ExitCode.OK, allowed.stdout


def test_an_xpass_fails_the_run_and_is_marked_in_the_junit_xml(tmp_path):
    """A non-strict xpass is otherwise a plain pass in the XML: scripts/vm/check-junit.py counts the property."""
    result = run_pytest(tmp_path, """
        @pytest.mark.xfail(reason="fixed since")
        def test_fixed():
            pass
    """, {"test_cases.py::test_fixed": "an allowed skip is no allowed xpass"})

    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "test_cases.py::test_fixed: XPASS (fixed since): remove the xfail mark" in result.stdout
    case, = ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")
    assert [(prop.get("name"), prop.get("value")) for prop in case.iter("property")] == [("xpass", "fixed since")]
    assert list(case) == [case.find("properties")]  # no failure, no skipped: the property is all that says so
