"""The root side imports only the standard library (issue 11).

`luksctl` runs as root through sudo: every module it loads is code that runs as
root, and start-up time on every open. The services keep Flask; none of that
may reach the CLI. luksctl.vault is shared: standard library only.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import luksctl

PACKAGE_DIR = Path(luksctl.__file__).parent
# Service-side modules: each imports third-party code, and none has a job in the CLI.
SERVICE_SIDE = ("luksctl.api", "luksctl.api.cluster", "luksctl.api.privileged", "luksctl.api.certs")

# Run in a fresh interpreter: the test process has already imported everything.
PROBE = """
import importlib, json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def imports_of(module: str) -> set[str]:
    """Every module named by an import statement in `module`'s source, top level or inside a function."""
    path = PACKAGE_DIR / (module.removeprefix("luksctl.").replace(".", "/") + ".py")
    package = module.split(".")[:-1]
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            named.add(node.module)
        elif isinstance(node, ast.ImportFrom):  # `from ..config import X`, `from . import audit, volume`
            base = ".".join(package[: len(package) - node.level + 1])
            if node.module:
                named.add(f"{base}.{node.module}")
            else:
                named.update(f"{base}.{alias.name}" for alias in node.names)
    return named


def root_modules() -> set[str]:
    """luksctl.root.cli and every luksctl module it reaches, however deep and however late the import."""
    found, pending = set(), ["luksctl.root.cli"]
    while pending:
        module = pending.pop()
        if module in found:
            continue
        found.add(module)
        pending += [name for name in imports_of(module) if name.split(".")[0] == "luksctl"]
    return found


def outside_stdlib(modules) -> list[str]:
    return sorted(name for name in modules if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "luksctl")


def loaded_in_fresh_interpreter(*modules: str) -> list[str]:
    # -I: no PYTHONPATH, no user site, no current directory: what the installed package loads.
    done = subprocess.run([sys.executable, "-I", "-c", PROBE, *modules], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_importing_the_cli_loads_only_the_standard_library_and_luksctl():
    loaded = loaded_in_fresh_interpreter("luksctl.root.cli")

    assert "luksctl.root.cli" in loaded  # the probe really imported it
    assert outside_stdlib(loaded) == []
    assert [name for name in loaded if name.startswith(SERVICE_SIDE)] == []


def test_every_module_the_cli_can_reach_imports_only_the_standard_library():
    """Also imports made inside functions, which a single `import luksctl.root.cli` would not run."""
    modules = root_modules()

    assert {"luksctl.root.cli", "luksctl.config", "luksctl.root.volume", "luksctl.runner"} <= modules
    assert [name for name in modules if name.startswith(SERVICE_SIDE)] == []
    assert {module: outside_stdlib(imports_of(module)) for module in sorted(modules)} == {module: [] for module in sorted(modules)}
    assert outside_stdlib(loaded_in_fresh_interpreter(*sorted(modules))) == []


def test_the_probe_sees_third_party_imports():
    """The check above can fail: the service side does load Flask."""
    loaded = loaded_in_fresh_interpreter("luksctl.api.frontend")

    assert {"flask"} <= {name.split(".")[0] for name in outside_stdlib(loaded)}


# Each costs milliseconds on every `luksctl status` (BENCHMARKS.md, start-up); the commands
# that change something import them when they run.
NOT_FOR_STATUS = {"luksctl.vault", "logging", "dataclasses", "inspect", "subprocess", "luksctl.root.volume", "luksctl.runner", "luksctl.root.lifecycle", "luksctl.root.setup"}


def test_status_starts_without_logging_dataclasses_or_the_commands_that_change_something():
    loaded = loaded_in_fresh_interpreter("luksctl.root.cli")

    assert "luksctl.status" in loaded
    assert NOT_FOR_STATUS & set(loaded) == set()


def test_building_the_parser_for_status_does_not_load_shutil():
    """argparse's help formatter imports shutil (with bz2 and lzma) to ask the terminal's width
    unless it is given one: cli._HelpFormatter gives it. 1.4 ms of every status."""
    probe = "import sys, luksctl.root.cli as cli; cli.build_parser(core_only=True).parse_args(['--json', 'status']); print(sorted({'shutil', 'bz2', 'lzma'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=True)

    assert done.stdout.strip() == "[]"
