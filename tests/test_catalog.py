"""The catalog as kedro-viz draws it: every persisted dataset has a layer, and layers never cycle."""

from __future__ import annotations

import pytest
from kedro.config import OmegaConfigLoader
from kedro.framework.project import configure_project
from kedro.io import DataCatalog

from tests.conftest import PROJECT_ROOT
from weighted_lowrank.pipeline_registry import register_pipelines
from weighted_lowrank.settings import CONFIG_LOADER_ARGS


@pytest.fixture(scope="module")
def catalog() -> DataCatalog:
    loader = OmegaConfigLoader(
        str(PROJECT_ROOT / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": "base"}
    )
    return DataCatalog.from_config(loader["catalog"])


def _layer(catalog: DataCatalog, name: str) -> str | None:
    dataset = None if name.startswith("params:") else catalog.get(name)
    metadata = getattr(dataset, "metadata", None) or {}
    return metadata.get("kedro-viz", {}).get("layer")


def _has_cycle(edges: set[tuple[str, str]]) -> bool:
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}

    def visit(node: str) -> bool:
        state[node] = 1
        for child in graph.get(node, ()):
            if state.get(child) == 1 or (child not in state and visit(child)):
                return True
        state[node] = 2
        return False

    return any(node not in state and visit(node) for node in list(graph))


@pytest.mark.parametrize("name", ["__default__", "refined", "risk_validation"])
def test_layers_form_no_cycle_so_kedro_viz_can_draw_them(catalog, name):
    configure_project("weighted_lowrank")
    pipeline = register_pipelines()[name]
    edges = set()
    for node in pipeline.nodes:
        sources = {_layer(catalog, dataset) for dataset in node.inputs} - {None}
        targets = {_layer(catalog, dataset) for dataset in node.outputs} - {None}
        edges |= {(source, target) for source in sources for target in targets if source != target}
    assert edges, "no layered datasets found"
    assert not _has_cycle(edges), sorted(edges)


def test_the_cycle_check_finds_a_cycle():
    assert _has_cycle({("a", "b"), ("b", "c"), ("c", "a")})
    assert not _has_cycle({("a", "b"), ("b", "c"), ("a", "c")})
