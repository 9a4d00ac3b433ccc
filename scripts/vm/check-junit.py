"""Fails a VM run that tested less than it selected: any test that did not plainly pass (a skip,
an xfail, an xpass), or fewer passes than selected tests.

usage: check-junit.py JUNIT_XML SELECTED_COUNT_FILE
pytest's own exit status misses these: a skip or an xfail counts as a success, and a conftest that
skips everything (say, because an export to the guest broke) gives exit 0 with nothing tested.
A strict xpass is a <failure>; a non-strict one is a plain pass in pytest's XML, so
tests/run_policy.py marks its testcase with the property `xpass`.
"""

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")


def outcome(case: ET.Element) -> str:
    if case.find("error") is not None:
        return "errors"
    if case.find("failure") is not None:
        return "failed"
    skipped = case.find("skipped")
    if skipped is not None:
        return "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
    if case.find("properties/property[@name='xpass']") is not None:
        return "xpassed"
    return "passed"


junit, selected_file = map(Path, sys.argv[1:3])
try:
    selected = int(selected_file.read_text())
    cases = list(ET.parse(junit).getroot().iter("testcase"))
except (OSError, ValueError, ET.ParseError) as exc:
    sys.exit(f"check-junit: cannot read the run's results: {exc}")
counts = Counter(outcome(case) for case in cases)
verdict = f"{selected} selected, {len(cases)} ran, " + ", ".join(f"{counts[name]} {name}" for name in OUTCOMES)
if selected == 0 or counts["passed"] != selected or counts["passed"] != len(cases):
    sys.exit(f"check-junit: FAILED: {verdict}: every selected VM test must run and pass")
print(f"check-junit: {verdict}")
