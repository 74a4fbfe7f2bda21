"""The package layout's import rules (README "Layout"): each part imports only the parts below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "weighted_lowrank"

#: What each part must not import (top-level packages and project parts).
FORBIDDEN = {
    "lowrank": {
        "kedro",
        "kedro_mlflow",
        "weighted_lowrank.hf",
        "weighted_lowrank.kedro_glue",
        "weighted_lowrank.analysis",
        "weighted_lowrank.pipelines",
    },
    "hf": {
        "kedro",
        "kedro_mlflow",
        "weighted_lowrank.kedro_glue",
        "weighted_lowrank.analysis",
        "weighted_lowrank.pipelines",
    },
    "kedro_glue": {"weighted_lowrank.analysis", "weighted_lowrank.pipelines"},
    "analysis": {"weighted_lowrank.pipelines"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_each_part_imports_only_what_the_layout_allows(part):
    broken = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in (PACKAGE / part).rglob("*.py")
        for name in _imports(path)
        if any(name == banned or name.startswith(banned + ".") for banned in FORBIDDEN[part])
    }
    assert broken == set()
