"""reporting pipeline: child-run records, comparison table and figures from fake evaluations;
run_history on child runs of the new shape (refined rows) and of the old (``*_refined`` metrics)."""

from __future__ import annotations

import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.pandas import ParquetDataset
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from tests.conftest import typed_params
from weighted_lowrank.lineage import FINGERPRINT_KEY, fingerprint_of
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.reporting import create_pipeline
from weighted_lowrank.pipelines.reporting.nodes import (
    child_run_record,
    comparison_table,
    markdown_table,
    refined_child_run_record,
)
from weighted_lowrank.pipelines.reporting.pipeline import (
    NAMESPACES,
    REFINED_NAMESPACES,
    SUMMARY_NODES,
    create_refined_reporting,
)
from weighted_lowrank.pipelines.reporting.run_history import (
    budget_table,
    child_runs,
    latest_per_budget,
    quality_vs_params_figure,
    with_refined_columns,
)

FINGERPRINT = "0123456789abcdef"
MODULES = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)] + [
    "bert.encoder.layer.0.output.dense"
]
REFINEMENT = typed_params("refinement", trainable="factors", epochs=2)


def fake_metrics(index: int) -> dict[str, float]:
    return {
        "accuracy": 0.7 + index / 100,
        "f1": 0.6,
        "mcc": 0.3,
        "test_loss": 0.5,
        "weighted_loss_rel_svd": 1.0 / (1 + index),
        "params_kept": 1000.0 - index,
        "params_model": 5000.0 - index,
        "params_ratio_layers": 0.5,
        "params_ratio_model": 0.8 + index / 1000,
        "size_on_disk_bytes": 4000.0,
        "latency_ms": 10.0 + index,
        "latency_dense_ms": 10.0 + index / 2,
        "latency_ratio": (10.0 + index) / (10.0 + index / 2),
        "factorization_seconds": 0.1 * index,
    }


def fake_record(index: int) -> dict:
    return {FINGERPRINT_KEY: FINGERPRINT, "metrics": fake_metrics(index)}


def fake_report(index: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "module": MODULES,
            "loss_rel_svd": [1.0 / (1 + index + layer) for layer in range(len(MODULES))],
        }
    )


def fake_convergence(index: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            (module, step, 0.1 * step * (1 + index), 2.0 / (1 + step + index))
            for module in MODULES
            for step in range(2)
        ],
        columns=["module", "step", "seconds", "loss"],
    )


def reporting_catalog(tmp_path, namespaces) -> tuple[DataCatalog, dict[str, dict]]:
    catalog = DataCatalog(
        {
            "params:compression": MemoryDataset(typed_params("compression", budget=0.5)),
            "params:model": MemoryDataset(typed_params("model")),
            "params:data": MemoryDataset(typed_params("data")),
            "params:seed": MemoryDataset(7),
            "params:reporting": MemoryDataset(typed_params("reporting", convergence_layers=2)),
            "params:refinement": MemoryDataset(REFINEMENT),
        }
    )
    records = {}
    for index, namespace in enumerate(namespaces):
        records[namespace] = fake_record(index)
        catalog[f"{namespace}.evaluation_metrics"] = records[namespace]
        catalog[f"{namespace}.mlflow_run"] = MemoryDataset()
    for index, solver in enumerate(SOLVERS):
        catalog[f"{solver}.layer_report"] = fake_report(index)
        catalog[f"{solver}.convergence"] = fake_convergence(index)
    # Persisted as in the project: the runner releases in-memory data once its consumers ran.
    catalog["comparison_table"] = ParquetDataset(filepath=str(tmp_path / "comparison.parquet"))
    for name in (
        "comparison_markdown",
        "accuracy_vs_params_plot",
        "layer_loss_plot",
        "convergence_plot",
    ):
        catalog[name] = MemoryDataset(copy_mode="assign")
    return catalog, records


def test_reporting_pipeline_on_fake_evaluations(tmp_path) -> None:
    catalog, evaluations = reporting_catalog(tmp_path, NAMESPACES)
    SequentialRunner().run(create_pipeline(), catalog)

    records = {namespace: catalog.load(f"{namespace}.mlflow_run") for namespace in NAMESPACES}
    assert len({tuple(sorted(r["params"])) for r in records.values()}) == 1
    assert len({tuple(sorted(r["metrics"])) for r in records.values()}) == 1
    assert records["als"]["metrics"] == evaluations["als"]["metrics"]
    assert records["dense"]["params"]["budget"] == 1.0 and records["als"]["params"]["budget"] == 0.5
    assert records["als"]["params"]["seed"] == 7 and records["als"]["params"]["solver"] == "als"
    assert {record["params"]["refinement"] for record in records.values()} == {"off"}
    assert records["dense"]["tags"] == {"kind": "dense", FINGERPRINT_KEY: FINGERPRINT}
    assert records["als"]["tags"]["kind"] == "solver"

    table = catalog.load("comparison_table")
    assert table["namespace"].tolist() == ["dense", *sorted(SOLVERS)]
    assert not [column for column in table.columns if column.endswith("_refined")]
    assert fingerprint_of(table) == FINGERPRINT
    als = table.set_index("namespace").loc["als"].drop(FINGERPRINT_KEY)
    assert als.to_dict() == pytest.approx(evaluations["als"]["metrics"])
    assert table.columns[:4].tolist() == ["namespace", "accuracy", "f1", "mcc"]
    markdown = catalog.load("comparison_markdown")
    assert "budget 0.5" in markdown and markdown.count("\n| ") == len(NAMESPACES) + 1
    assert FINGERPRINT_KEY not in markdown
    for name in ("accuracy_vs_params_plot", "layer_loss_plot", "convergence_plot"):
        assert isinstance(catalog.load(name), Figure)
    assert len(catalog.load("convergence_plot").axes) == 2
    # One filled marker per solver; no refined rows, so no hollow ones.
    markers = catalog.load("accuracy_vs_params_plot").axes[0].collections
    assert len(markers) == len(SOLVERS)


def test_refined_rows_are_child_runs_and_rows_of_their_own(tmp_path) -> None:
    default = create_pipeline()
    pipeline = (default - default.only_nodes(*SUMMARY_NODES)) + create_refined_reporting()
    namespaces = (*NAMESPACES, *REFINED_NAMESPACES)
    catalog, evaluations = reporting_catalog(tmp_path, namespaces)
    SequentialRunner().run(pipeline, catalog)

    records = {namespace: catalog.load(f"{namespace}.mlflow_run") for namespace in namespaces}
    assert len({tuple(sorted(r["params"])) for r in records.values()}) == 1
    assert len({tuple(sorted(r["metrics"])) for r in records.values()}) == 1
    for namespace, record in records.items():
        refined = namespace.startswith("refined.")
        assert record["params"]["solver"] == namespace
        assert record["params"]["refinement"] == ("factors, 2 epoch(s)" if refined else "off")
        assert (record["tags"]["kind"] == "refined") == refined
    assert records["refined.als"]["params"]["budget"] == 0.5
    assert records["refined.als"]["metrics"] == evaluations["refined.als"]["metrics"]

    table = catalog.load("comparison_table")
    assert table["namespace"].tolist() == [
        "dense",
        *sorted(SOLVERS),
        *(f"refined.{solver}" for solver in sorted(SOLVERS)),
    ]
    assert not [column for column in table.columns if column.endswith("_refined")]
    markdown = catalog.load("comparison_markdown")
    assert markdown.count("\n| ") == len(namespaces) + 1 and "| refined.svd |" in markdown

    # Hollow markers for the refined rows, each in its solver's colour and joined to its point.
    axis = catalog.load("accuracy_vs_params_plot").axes[0]
    filled = [points for points in axis.collections if len(points.get_facecolor())]
    hollow = [points for points in axis.collections if not len(points.get_facecolor())]
    assert len(filled) == len(hollow) == len(SOLVERS)
    colours = {tuple(points.get_facecolor()[0]) for points in filled}
    assert {tuple(points.get_edgecolor()[0]) for points in hollow} == colours
    joins = [line for line in axis.lines if line.get_label() != "dense"]
    assert len(joins) == len(SOLVERS)
    rows = table.set_index("namespace")
    for line in joins:
        assert sorted(line.get_ydata()) in [
            sorted([rows.loc[solver, "accuracy"], rows.loc[f"refined.{solver}", "accuracy"]])
            for solver in SOLVERS
        ]
        assert to_rgba(line.get_color()) in colours


def test_child_run_params_come_from_the_typed_blocks() -> None:
    data = typed_params("data", source="glue")
    targets = ["bert.encoder.layer.0.attention.self.query"]
    compression = typed_params("compression", budget=0.3, targets=targets)
    model = typed_params("model")
    record = refined_child_run_record(
        fake_record(1), compression, model, data, 3, REFINEMENT, namespace="refined.svd"
    )
    assert record["params"]["task"] == data.glue.task
    assert record["params"]["targets"] == str(targets)  # as the YAML list reads
    assert record["params"]["refinement"] == REFINEMENT.describe() == "factors, 2 epoch(s)"
    base = child_run_record(fake_record(1), compression, model, data, 3, namespace="svd")
    assert base["params"]["refinement"] == "off"
    assert set(base["params"]) == set(record["params"])
    assert base["metrics"] == record["metrics"] == fake_metrics(1)


def test_comparison_needs_the_dense_baseline() -> None:
    with pytest.raises(ValueError, match="dense evaluation"):
        comparison_table(svd=fake_record(0))


def test_markdown_table_formats_floats() -> None:
    text = markdown_table(pd.DataFrame({"a": ["x"], "b": [0.123456]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 0.1235 |"]


# ----------------------------------------------------------------------------- run_history


def log_child(client, experiment, parent, name, budget, metrics, refinement="off") -> None:
    run = client.create_run(
        experiment, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id}
    )
    for key, value in {"solver": name, "budget": budget, "refinement": refinement}.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One run of the old shape (``*_refined`` metrics, budget 0.3), then a default run and a
    refinement run of the new shape (budget 0.5)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("weighted_lowrank")
    old = client.create_run(experiment, run_name="__default__")
    old_refined = {"accuracy_refined": 0.78, "test_loss_refined": 0.4, "refinement_seconds": 9.0}
    log_child(client, experiment, old, "dense", 1.0, {"accuracy": 0.8, "accuracy_refined": 0.8})
    log_child(
        client,
        experiment,
        old,
        "svd",
        0.3,
        {"accuracy": 0.6, "params_ratio_model": 0.7, **old_refined},
        "all, 1 epoch(s)",
    )
    default = client.create_run(experiment, run_name="__default__")
    log_child(client, experiment, default, "dense", 1.0, {"accuracy": 0.81})
    for solver, accuracy in (("svd", 0.65), ("tfwsvd", 0.75)):
        log_child(
            client,
            experiment,
            default,
            solver,
            0.5,
            {"accuracy": accuracy, "params_ratio_model": 0.8},
        )
    refinement = client.create_run(experiment, run_name="refinement")
    log_child(
        client,
        experiment,
        refinement,
        "refined.svd",
        0.5,
        {"accuracy": 0.77, "params_ratio_model": 0.8},
        "all, 1 epoch(s)",
    )
    return uri


def test_child_runs_read_old_refined_metrics_as_refined_rows(store) -> None:
    runs = child_runs(store)
    assert not [column for column in runs.columns if column.endswith("_refined")]
    assert "refinement_seconds" not in runs
    old = runs[runs["budget"] == 0.3].set_index("solver")
    assert old.loc["svd", "accuracy"] == 0.6 and old.loc["svd", "refinement"] == "off"
    assert old.loc["refined.svd", "accuracy"] == 0.78
    assert old.loc["refined.svd", "test_loss"] == 0.4
    assert old.loc["refined.svd", "refinement"] == "all, 1 epoch(s)"
    assert old.loc["refined.svd", "params_ratio_model"] == 0.7
    assert sorted(runs.loc[runs["budget"] == 0.5, "solver"]) == ["refined.svd", "svd", "tfwsvd"]


def test_budget_table_and_plot_show_refined_rows_beside_their_solver(store) -> None:
    latest = latest_per_budget(child_runs(store))
    assert latest.loc[latest["solver"] == "dense", "accuracy"].tolist() == [0.81]
    wide = with_refined_columns(latest).set_index(["solver", "budget"])
    assert "refined.svd" not in wide.index.get_level_values("solver")
    assert wide.loc[("svd", 0.5), "accuracy_refined"] == 0.77
    assert pd.isna(wide.loc[("tfwsvd", 0.5), "accuracy_refined"])

    summary = budget_table(latest)
    assert list(summary.index) == ["dense", "svd", "tfwsvd"]
    assert list(summary.columns) == [
        ("accuracy", 0.3),
        ("accuracy", 0.5),
        ("accuracy", 1.0),
        ("accuracy_refined", 0.3),
        ("accuracy_refined", 0.5),
    ]
    assert summary.loc["svd", ("accuracy_refined", 0.5)] == 0.77
    assert summary.loc["svd", ("accuracy_refined", 0.3)] == 0.78

    lines = {line.get_label(): line for line in quality_vs_params_figure(latest).axes[0].lines}
    assert {"svd", "svd refined", "tfwsvd"} <= set(lines) and "tfwsvd refined" not in lines
    assert list(lines["svd refined"].get_ydata()) == [0.78, 0.77]
    assert lines["svd refined"].get_color() == lines["svd"].get_color()


def test_refined_only_keeps_the_solvers_that_were_refined(store) -> None:
    latest = latest_per_budget(child_runs(store), refined_only=True)
    assert sorted(latest["solver"]) == ["dense", "refined.svd", "refined.svd", "svd", "svd"]
    runs = child_runs(store)
    with pytest.raises(ValueError, match="--pipelines refined"):
        latest_per_budget(runs[~runs["solver"].str.startswith("refined.")], refined_only=True)
