"""Dependencies point one way: `infra` <- `curation` / `training` / `evaluation` <- `flows` (the CLI on top).

Read from the source with `ast`, so an import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ABOVE = {
    "infra": {"flows", "curation", "training", "evaluation"},
    "curation": {"flows", "training", "evaluation"},
    "training": {"flows", "curation", "evaluation"},
    "evaluation": {"flows", "curation"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_package_imports_a_package_above_it(package):
    wrong = {}
    for path in sorted((REPO / package).rglob("*.py")):
        bad = imported_packages(path) & ABOVE[package]
        if bad:
            wrong[str(path.relative_to(REPO))] = sorted(bad)
    assert wrong == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from flows.pipeline import pipeline\n    import training.pretrain\n")
    assert imported_packages(module) == {"flows", "training"}
