"""Imports run one way: rl/ and callbacks/ use carla_env/, models/ and common/; never the reverse."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAY_NOT_IMPORT = {
    "common": {"rl", "callbacks", "carla_env", "models"},
    "models": {"rl", "callbacks", "carla_env"},
    "carla_env": {"rl", "callbacks"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", MAY_NOT_IMPORT)
def test_lower_packages_never_import_higher_ones(package):
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & MAY_NOT_IMPORT[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {file: names for file, names in wrong.items() if names} == {}
