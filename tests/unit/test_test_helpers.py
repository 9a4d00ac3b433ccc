"""The tests' own layout: helpers live in helper modules (tests/support, *_fakes, conftest),
never in a test module that another test module imports."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module name `path` imports, absolute or relative (`from .x import y` gives `x`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                names.add(node.module)
            elif node.level:  # `from . import test_x`
                names.update(alias.name for alias in node.names)
    return names


def modules_importing_tests(tests: Path) -> list[tuple[str, str]]:
    return [
        (str(path.relative_to(tests)), name)
        for path in sorted(tests.rglob("*.py"))
        for name in sorted(imported_modules(path))
        if name.rpartition(".")[2].startswith("test_")
    ]


def test_no_module_imports_a_test_module():
    assert modules_importing_tests(TESTS) == []


def test_the_check_sees_a_test_module_imported(tmp_path):
    (tmp_path / "test_a.py").write_text("from test_b import helper\nfrom .test_c import x\nfrom . import test_d\nimport tests.vault.test_e\n")
    (tmp_path / "helpers.py").write_text("from support.waiting import wait_until\nimport json\n")

    assert modules_importing_tests(tmp_path) == [
        ("test_a.py", "test_b"), ("test_a.py", "test_c"), ("test_a.py", "test_d"), ("test_a.py", "tests.vault.test_e"),
    ]
