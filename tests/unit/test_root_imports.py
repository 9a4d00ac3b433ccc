"""The root side imports only the standard library (issue 11), and nothing imports in a circle (issue 19).

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

import pytest

import luksctl

PACKAGE_DIR = Path(luksctl.__file__).parent
SERVICE_SIDE = "luksctl.api"  # Flask, gunicorn, cryptography: the services' package, and only theirs

# Run in a fresh interpreter: the test process has already imported everything.
PROBE = """
import importlib, json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def module_path(module: str) -> Path:
    relative = PACKAGE_DIR / module.removeprefix("luksctl").lstrip(".").replace(".", "/")
    return relative / "__init__.py" if (relative / "__init__.py").exists() else relative.with_suffix(".py")


def all_modules() -> list[str]:
    """Every module of the package, found on disk: no list to keep."""
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports_in(module: str, source: str) -> set[str]:
    """Every module named by an import statement in `source` (the text of `module`), top level or inside a function."""
    is_package = module_path(module).name == "__init__.py" if module in all_modules() else False
    package = module.split(".") if is_package else module.split(".")[:-1]
    named = set()
    for node in ast.walk(ast.parse(source)):
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


def imports_of(module: str) -> set[str]:
    return imports_in(module, module_path(module).read_text())


def is_root_side(module: str) -> bool:
    """luksctl.root.* and the shared modules luksctl.X: everything but the service side."""
    return module.startswith("luksctl") and not (module == SERVICE_SIDE or module.startswith(SERVICE_SIDE + "."))


def root_side_violations(module: str, source: str) -> list[str]:
    """What `source`, as root-side `module`, must not import: the service side or anything outside the standard library."""
    return sorted(name for name in imports_in(module, source)
                  if (name.split(".")[0] == "luksctl" and not is_root_side(name))
                  or name.split(".")[0] not in (*sys.stdlib_module_names, "luksctl"))


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (module -> modules it imports), as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def package_import_graph() -> dict[str, set[str]]:
    modules = set(all_modules())
    # `from . import audit` names luksctl.audit; `from .config import X` names luksctl.config: both edges.
    return {module: {name for name in imports_of(module) if name in modules and name != module} for module in modules}


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
    assert [name for name in loaded if not is_root_side(name) and name.startswith("luksctl")] == []


def test_no_root_side_module_imports_the_service_side_or_a_third_party_package():
    """By package prefix: every module under luksctl but luksctl.api, including the imports made inside functions."""
    root_side = [module for module in all_modules() if is_root_side(module)]

    assert {"luksctl.root.cli", "luksctl.config", "luksctl.root.volume", "luksctl.secret_input"} <= set(root_side)
    assert {module: root_side_violations(module, module_path(module).read_text()) for module in root_side} == {module: [] for module in root_side}
    assert outside_stdlib(loaded_in_fresh_interpreter(*root_side)) == []


@pytest.mark.parametrize(("module", "source", "found"), [
    ("luksctl.root.newcmd", "from ..api import vault\n", ["luksctl.api"]),
    ("luksctl.root.newcmd", "def later():\n    from ..api.privileged import SudoBridge\n", ["luksctl.api.privileged"]),
    ("luksctl.root.newcmd", "import requests\n", ["requests"]),
    ("luksctl.newshared", "def later():\n    import hvac.exceptions\n", ["hvac.exceptions"]),
    ("luksctl.newshared", "from luksctl.api.certs import load\n", ["luksctl.api.certs"]),
    ("luksctl.root.newcmd", "import json, ssl\nfrom .. import errors\nfrom . import volume\n", []),
])
def test_the_prefix_rule_fails_on_a_root_side_module_that_imports_the_service_side_or_a_third_party_package(module, source, found):
    assert root_side_violations(module, source) == found


def test_no_import_cycle_anywhere_in_the_package():
    """Imports inside functions count: they hide a cycle, they do not break it."""
    graph = package_import_graph()

    assert {"luksctl.root.cli", "luksctl.api.frontend", "luksctl.secret_input"} <= set(graph)
    assert import_cycle(graph) is None


def test_the_cycle_check_finds_a_cycle():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


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
