"""deploy/ansible: the role is lint-clean, parses, and documents every variable it reads.

Running it is tested for real in the systemd boot (tests/vm/systemd/test_ansible_role.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "luksctl"
VENV_BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ANSIBLE_DIR, capture_output=True, text=True, timeout=300)


def test_the_role_and_playbook_pass_ansible_lint_production_profile():
    result = run(str(VENV_BIN / "ansible-lint"), "--nocolor")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_the_sample_playbook_parses_with_both_sample_inventories():
    for inventory in ("single_vm", "cluster"):
        result = run(str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", f"inventory/{inventory}.yml", "site.yml")
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_role_default_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Install with Ansible", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", section))

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())

    assert set(defaults) - documented == set()
