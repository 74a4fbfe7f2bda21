"""reporting pipeline: child-run records, comparison table and figures from fake evaluations."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.pandas import ParquetDataset
from matplotlib.figure import Figure

from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.reporting import create_pipeline
from weighted_lowrank.pipelines.reporting.nodes import comparison_table, markdown_table

MODULES = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)] + [
    "bert.encoder.layer.0.output.dense"
]


def fake_metrics(index: int) -> dict[str, float]:
    return {
        "accuracy": 0.7 + index / 100,
        "f1": 0.6,
        "mcc": 0.3,
        "weighted_loss_rel_svd": 1.0 / (1 + index),
        "params_kept": 1000.0 - index,
        "params_ratio_layers": 0.5,
        "params_ratio_model": 0.8,
        "size_on_disk_bytes": 4000.0,
        "latency_ms": 10.0 + index,
        "latency_dense_ms": 10.0 + index / 2,
        "latency_ratio": (10.0 + index) / (10.0 + index / 2),
        "factorization_seconds": 0.1 * index,
    }


def fake_report(index: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "module": MODULES,
            "loss_rel_svd": [1.0 / (1 + index + layer) for layer in range(len(MODULES))],
            "history": [
                json.dumps([[0.0, 2.0], [0.1 * (1 + index), 1.0 / (1 + index)]]) for _ in MODULES
            ],
        }
    )


@pytest.mark.parametrize("refined", [False, True])
def test_reporting_pipeline_on_fake_evaluations(tmp_path, refined) -> None:
    namespaces = ["dense", *SOLVERS]
    refinement = {"enabled": refined, "trainable": "factors", "epochs": 2}
    catalog = DataCatalog(
        {
            "params:compression": MemoryDataset({"budget": 0.5, "targets": None}),
            "params:model": MemoryDataset(
                {"source": "embedded:all-MiniLM-L6-v2", "max_length": 64}
            ),
            "params:data": MemoryDataset({"source": "catalog"}),
            "params:seed": MemoryDataset(7),
            "params:reporting": MemoryDataset({"convergence_layers": 2}),
            "params:refinement": MemoryDataset(refinement),
        }
    )
    evaluations = {}
    for index, namespace in enumerate(namespaces):
        evaluations[namespace] = fake_metrics(index)
        if refined:
            evaluations[namespace]["accuracy_refined"] = 0.95 - 0.01 * index
        catalog[f"{namespace}.evaluation_metrics"] = evaluations[namespace]
        catalog[f"{namespace}.mlflow_run"] = MemoryDataset()
        if namespace != "dense":
            catalog[f"{namespace}.layer_report"] = fake_report(index)
    # Persisted as in the project: the runner releases in-memory data once its consumers ran.
    catalog["comparison_table"] = ParquetDataset(filepath=str(tmp_path / "comparison.parquet"))
    for name in (
        "comparison_markdown",
        "accuracy_vs_params_plot",
        "layer_loss_plot",
        "convergence_plot",
    ):
        catalog[name] = MemoryDataset(copy_mode="assign")
    SequentialRunner().run(create_pipeline(), catalog)

    records = {namespace: catalog.load(f"{namespace}.mlflow_run") for namespace in namespaces}
    assert len({tuple(sorted(r["params"])) for r in records.values()}) == 1
    assert len({tuple(sorted(r["metrics"])) for r in records.values()}) == 1
    assert records["dense"]["params"]["budget"] == 1.0 and records["als"]["params"]["budget"] == 0.5
    assert records["als"]["params"]["seed"] == 7 and records["als"]["params"]["solver"] == "als"
    expected = "factors, 2 epoch(s)" if refined else "off"
    assert {record["params"]["refinement"] for record in records.values()} == {expected}

    table = catalog.load("comparison_table")
    assert table["namespace"].tolist() == ["dense", *sorted(SOLVERS)]
    als = table.set_index("namespace").loc["als"]
    assert als.to_dict() == pytest.approx(evaluations["als"])
    columns = ["namespace", "accuracy", *(["accuracy_refined"] if refined else []), "f1", "mcc"]
    assert table.columns[: len(columns)].tolist() == columns
    markdown = catalog.load("comparison_markdown")
    assert "budget 0.5" in markdown and markdown.count("\n| ") == len(namespaces) + 1
    for name in ("accuracy_vs_params_plot", "layer_loss_plot", "convergence_plot"):
        assert isinstance(catalog.load(name), Figure)
    assert len(catalog.load("convergence_plot").axes) == 2
    # One marker per solver, and with refinement a hollow one for its refined model.
    markers = catalog.load("accuracy_vs_params_plot").axes[0].collections
    assert len(markers) == len(SOLVERS) * (2 if refined else 1)


def test_comparison_needs_the_dense_baseline() -> None:
    with pytest.raises(ValueError, match="dense evaluation"):
        comparison_table(svd=fake_metrics(0))


def test_markdown_table_formats_floats() -> None:
    text = markdown_table(pd.DataFrame({"a": ["x"], "b": [0.123456]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 0.1235 |"]
