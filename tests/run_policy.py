"""What fails a test run besides a failure: a skip or an xfail that the allow-list does not name,
and any xpass. pytest's exit status counts all three as a success, so a test that quietly stopped
testing (a tool missing, a fixture that skips) would go unnoticed. tests/conftest.py registers
this for every run, host and VM, with its list of allowed skips.

A non-strict xpass is a plain pass in pytest's JUnit XML: its testcase gets the property `xpass`
here, which scripts/vm/check-junit.py counts.
"""

from __future__ import annotations

import pytest


class RunPolicy:
    def __init__(self, allowed_skips: dict[str, str]):
        self.allowed_skips = allowed_skips  # test id -> why it may skip
        self.refused: list[str] = []  # one line per outcome that fails the run

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        # A strict xpass is reported as a failure already.
        if report.passed and hasattr(report, "wasxfail"):
            item.user_properties.append(("xpass", report.wasxfail))  # the teardown report carries it to the XML
            self.refused.append(f"{report.nodeid}: XPASS ({report.wasxfail}): remove the xfail mark")
        return report

    def pytest_runtest_logreport(self, report):
        self._check_skip(report)

    def pytest_collectreport(self, report):
        self._check_skip(report)  # a module that skips itself

    def _check_skip(self, report) -> None:
        if not report.skipped or report.nodeid in self.allowed_skips:
            return
        if hasattr(report, "wasxfail"):
            what = f"XFAIL ({report.wasxfail})"
        else:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            what = f"SKIPPED ({reason.removeprefix('Skipped: ')})"
        self.refused.append(f"{report.nodeid}: {what}, and ALLOWED_SKIPS in tests/conftest.py does not name it")

    def pytest_sessionfinish(self, session):
        # Exit 5, no tests collected, is what a run gets whose only module skipped itself.
        if self.refused and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.refused:
            terminalreporter.section("run policy: these fail the run", red=True)
            for line in self.refused:
                terminalreporter.line(line)
