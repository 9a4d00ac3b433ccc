"""deploy/prometheus/: the alert rules pass Debian's promtool (check and their own unit tests), and
name only metrics that luksctl writes: the root side's textfile and the services' /metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from luksctl.api import metrics
from luksctl.root import textfile

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "luksctl-rules.yml"
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}

# Every field textfile.metrics reads, so that every metric it can write is written.
FULL_REPORT = {
    "volume_state": "mounted", "mapper_open": True, "mounted": True, "device_present": True,
    "last_open": "2026-12-02T07:00:00.000+00:00", "last_key_change": "2026-12-01T07:00:00.000+00:00",
    "pending_since": {"setup": 1.0, "rotate": 2.0}, "setup_steps": ["vault-written"], "stale_header_copies": [],
    "keyslots": [{"slot": 0, "pbkdf": "argon2id", "time": 4, "memory": 1048576, "cpus": 4, "recovery_key": False}],
    "header_backup": {"path": "/etc/luks/luks-header.bck", "exists": True, "age_seconds": 10.0, "intact": True, "matches": True,
                      "same_volume": True, "keyslots_current": True},
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: install Debian's prometheus package (scripts/install-host-deps.sh does)"
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=RULES.parent, timeout=120)


def test_the_rules_pass_promtool_check():
    checked = promtool("check", "rules", RULES.name)

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_rules_pass_their_promtool_tests():
    tested = promtool("test", "rules", "luksctl-rules.test.yml")

    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def written_metrics() -> set[str]:
    root_side = {line.split()[2] for line in textfile.metrics(FULL_REPORT, 0).splitlines() if line.startswith("# TYPE")}
    services = {family.name + suffix for family in metrics.COUNTED.collect() for suffix in SAMPLE_SUFFIXES[family.type]}
    return root_side | services | set(metrics.STATE_HELP)


def test_every_metric_the_rules_name_is_one_luksctl_writes():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    named = {name for rule in rules for name in re.findall(r"\bluksctl_\w+", rule["expr"])}

    assert named and named <= written_metrics(), named - written_metrics()


def test_the_stale_textfile_alert_waits_for_three_missed_runs_of_the_timer():
    threshold = int(re.search(r"luksctl_report_timestamp_seconds > (\d+)", RULES.read_text())[1])
    period = int(re.search(r"^OnUnitActiveSec=(\d+)min$", (DEPLOY / "luksctl-report.timer").read_text(), re.MULTILINE)[1]) * 60

    assert threshold >= 3 * period
