"""Fails a VM run that tested less than it selected: any skip, or fewer passes than selected tests.

usage: check-junit.py JUNIT_XML SELECTED_COUNT_FILE
pytest's own exit status misses both: a skipped test counts as a success, and a conftest that
skips everything (say, because an export to the guest broke) gives exit 0 with nothing tested.
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

junit, selected_file = map(Path, sys.argv[1:3])
try:
    selected = int(selected_file.read_text())
    suites = ET.parse(junit).getroot().iter("testsuite")
except (OSError, ValueError, ET.ParseError) as exc:
    sys.exit(f"check-junit: cannot read the run's results: {exc}")
totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for suite in suites:
    for key in totals:
        totals[key] += int(suite.get(key, 0))
passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
verdict = f"{selected} selected, {totals['tests']} ran, {passed} passed, {totals['skipped']} skipped"
if selected == 0 or totals["skipped"] or passed != selected:
    sys.exit(f"check-junit: FAILED: {verdict}: every selected VM test must run and pass")
print(f"check-junit: {verdict}")
