"""requirements.lock and requirements-build.lock, which deploy/install.sh installs with
--require-hashes, match pyproject.toml.

Every runtime dependency (and every build requirement) is pinned to one version that pyproject's
specifier allows, and every pin carries hashes, so every node of a cluster runs the same bytes.
`make lock` regenerates the files. `packaging` here is the installed distribution (pytest depends on
it), not pip's vendored copy.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
BUILD_LOCK = REPO / "requirements-build.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def runtime_requirements() -> list[Requirement]:
    """The services' dependencies: the base ones (none today) and the `server` extra's."""
    project = PYPROJECT["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["server"]]


def build_requirements() -> list[Requirement]:
    return [Requirement(text) for text in PYPROJECT["build-system"]["requires"]]


def lock_entries(text: str) -> dict[str, tuple[Requirement, list[str]]]:
    """name -> (the pinned requirement, its hashes), from pip-compile's format."""
    entries = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line.split(" --hash=")[0].strip())
        entries[canonicalize_name(requirement.name)] = (requirement, re.findall(r"--hash=(\S+)", line))
    return entries


def lock_problems(text: str, requirements: list[Requirement] | None = None, lock: str = "requirements.lock") -> list[str]:
    entries = lock_entries(text)
    problems = []
    for name, (pin, hashes) in entries.items():
        if [spec.operator for spec in pin.specifier] != ["=="]:
            problems.append(f"{pin} is not pinned to one version")
        if not hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", digest) for digest in hashes):
            problems.append(f"{name} has no sha256 hash: pip install --require-hashes would refuse the file")
    for wanted in runtime_requirements() if requirements is None else requirements:
        name = canonicalize_name(wanted.name)
        if name not in entries:
            problems.append(f"{wanted} is in pyproject.toml but not in {lock}")
            continue
        pinned = [spec.version for spec in entries[name][0].specifier]
        if not all(wanted.specifier.contains(version, prereleases=True) for version in pinned):
            problems.append(f"{lock} pins {entries[name][0]}, outside pyproject.toml's {wanted}")
    return problems


def test_lock_pins_every_runtime_dependency_within_its_specifier_with_hashes():
    assert lock_problems(LOCK.read_text()) == [], "run make lock"


def test_build_lock_pins_the_build_backend_within_its_specifier_with_hashes():
    """install.sh builds luksctl with --no-build-isolation: this backend is what runs, as root."""
    assert lock_problems(BUILD_LOCK.read_text(), build_requirements(), BUILD_LOCK.name) == [], "run make lock"
    assert set(lock_entries(BUILD_LOCK.read_text())) == {"setuptools"}


def test_lock_problems_are_found():
    """The check above can fail: a missing pin, a pin without hashes, a pin outside the specifier."""
    text = LOCK.read_text()
    without_flask = re.sub(r"(?m)^flask==.*(\n    .*)*\n", "", text)
    blinker_without_hashes = re.sub(r"(?m)^(blinker==\S+) \\\n(    --hash=.*\n)+", r"\1\n", text)
    old_flask = re.sub(r"(?m)^flask==\S+", "flask==2.0.0", text)
    range_for_gunicorn = re.sub(r"(?m)^gunicorn==\S+", "gunicorn>=22", text)

    assert any("flask" in problem and "not in requirements.lock" in problem for problem in lock_problems(without_flask))
    assert any("blinker has no sha256 hash" in problem for problem in lock_problems(blinker_without_hashes))
    assert any("flask==2.0.0, outside" in problem for problem in lock_problems(old_flask))
    assert any("gunicorn>=22 is not pinned" in problem for problem in lock_problems(range_for_gunicorn))

