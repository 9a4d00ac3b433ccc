"""scripts/vm/check-junit.py, which judges a VM run from pytest's JUnit XML: only a run where every
selected test ran and plainly passed gets exit 0. Fed small XML files in pytest's own format; a
non-strict xpass carries the property tests/run_policy.py gives it (test_run_policy.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vm" / "check-junit.py"

# One <testcase> per outcome, as pytest 9 writes them.
CASES = {
    "passed": '<testcase classname="test_x" name="test_pass" time="0.001"/>',
    "failed": '<testcase classname="test_x" name="test_fail" time="0.001">'
              '<failure message="assert False">assert False</failure></testcase>',
    "errors": '<testcase classname="test_x" name="test_error" time="0.001">'
              '<error message="failed on setup with &quot;RuntimeError&quot;">RuntimeError</error></testcase>',
    "skipped": '<testcase classname="test_x" name="test_skip" time="0.001">'
               '<skipped type="pytest.skip" message="why">test_x.py:8: why</skipped></testcase>',
    "xfailed": '<testcase classname="test_x" name="test_xfail" time="0.001">'
               '<skipped type="pytest.xfail" message="known"/></testcase>',
    "xpassed": '<testcase classname="test_x" name="test_xpass" time="0.001">'
               '<properties><property name="xpass" value="known"/></properties></testcase>',
    "strict xpass": '<testcase classname="test_x" name="test_xpass_strict" time="0.001">'
                    '<failure message="[XPASS(strict)] known">[XPASS(strict)] known</failure></testcase>',
}


def junit(*outcomes: str) -> str:
    # The suite's own totals are left at 0: the verdict must come from the testcases.
    cases = "".join(CASES[outcome] for outcome in outcomes)
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
            f'<testsuite name="pytest" errors="0" failures="0" skipped="0" tests="0">{cases}</testsuite></testsuites>')


def check(tmp_path: Path, xml: str, selected: int) -> subprocess.CompletedProcess:
    (tmp_path / "junit.xml").write_text(xml)
    (tmp_path / "selected-tests.txt").write_text(f"{selected}\n")
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "junit.xml"), str(tmp_path / "selected-tests.txt")],
                          capture_output=True, text=True, timeout=30)


def test_a_run_where_every_selected_test_passed_passes(tmp_path):
    result = check(tmp_path, junit("passed", "passed"), 2)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "check-junit: 2 selected, 2 ran, 2 passed, 0 failed, 0 errors, 0 skipped, 0 xfailed, 0 xpassed\n"


@pytest.mark.parametrize("outcome", ["failed", "errors", "skipped", "xfailed", "xpassed", "strict xpass"])
def test_any_outcome_but_a_pass_fails_the_run(tmp_path, outcome):
    result = check(tmp_path, junit("passed", outcome), 2)

    assert result.returncode == 1
    counted = "failed" if outcome == "strict xpass" else outcome
    assert result.stderr.startswith(f"check-junit: FAILED: 2 selected, 2 ran, 1 passed, ")
    assert f" 1 {counted}" in result.stderr and "every selected VM test must run and pass" in result.stderr


@pytest.mark.parametrize("selected", [0, 3])
def test_a_run_with_zero_tests_fails(tmp_path, selected):
    result = check(tmp_path, junit(), selected)

    assert result.returncode == 1
    assert f"FAILED: {selected} selected, 0 ran, 0 passed" in result.stderr


def test_fewer_passes_than_selected_tests_fail_the_run(tmp_path):
    result = check(tmp_path, junit("passed"), 2)

    assert result.returncode == 1
    assert "FAILED: 2 selected, 1 ran, 1 passed" in result.stderr


def test_results_it_cannot_read_fail_the_run(tmp_path):
    result = check(tmp_path, "<testsuites><testsuite>", 1)

    assert result.returncode == 1
    assert result.stderr.startswith("check-junit: cannot read the run's results")
