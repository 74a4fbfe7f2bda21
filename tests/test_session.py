"""One real ``kedro run`` of the ``refined`` pipeline (smoke environment) through a KedroSession,
shared by a few focused tests.

``refined`` is ``__default__`` plus refinement, so one run covers every node of the default run.
The project's conf/ and embedded data are copied to a temporary project so the run writes
nothing into the checkout; the model is a tiny random BERT saved to a local directory, and MLflow
logs into a temporary sqlite store through the ``mlflow_tracking_uri`` runtime parameter.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import nbformat
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from tests.conftest import make_tiny_bundle
from weighted_lowrank.analysis.run_history import (
    budget_table,
    child_runs,
    latest_per_budget,
)
from weighted_lowrank.analysis.sweep import end_active_runs
from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.lowrank.layer import lowrank_modules
from weighted_lowrank.lowrank.serialization import load_compressed
from weighted_lowrank.lowrank.solvers import SOLVERS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REFINED = tuple(f"refined.{solver}" for solver in SOLVERS)
COMMON_METRICS = {
    "accuracy",
    "f1",
    "mcc",
    "weighted_loss_rel_svd",
    "params_kept",
    "params_ratio_layers",
    "params_ratio_model",
    "size_on_disk_bytes",
    "latency_ms",
    "factorization_seconds",
}


@dataclass(frozen=True)
class SmokeRun:
    project: Path
    model_dir: Path
    tracking_uri: str
    parent: Run
    children: dict[str, Run]


def copy_project(project: Path, bundle: ModelBundle | None = None) -> Path:
    """Copy conf/ and the embedded data into ``project`` and save ``bundle`` (default: a tiny
    random BERT classifier) as its model directory; returns that directory."""
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()  # bootstrap_project wants it; the package itself is installed
    shutil.copytree(PROJECT_ROOT / "data" / "01_raw", project / "data" / "01_raw")
    model_dir = project / "tiny_model"
    bundle = bundle or make_tiny_bundle()
    bundle.model.save_pretrained(model_dir)
    bundle.tokenizer.save_pretrained(model_dir)
    return model_dir


def kedro_run(
    project: Path, pipeline: str | list[str], runtime_params: dict, **options: Any
) -> None:
    """``kedro run --env smoke --pipelines <pipeline>`` (``options``: ``session.run``'s, e.g.
    ``node_names``) of ``project`` in this process, MLflow's tracking URI and active runs
    restored afterwards (also when the run fails)."""
    previous_uri = mlflow.get_tracking_uri()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(project)
            bootstrap_project(project)
            with KedroSession.create(
                project_path=project, env="smoke", runtime_params=runtime_params
            ) as session:
                names = [pipeline] if isinstance(pipeline, str) else pipeline
                session.run(pipeline_names=names, **options)
    finally:
        end_active_runs()
        mlflow.set_tracking_uri(previous_uri)


def run_smoke(
    project: Path, model_dir: Path, pipeline: str, params: dict | None = None
) -> SmokeRun:
    """:func:`kedro_run` on ``model_dir`` (with ``params`` merged into the runtime parameters),
    logging into the project's own sqlite store; returns the one parent run and its child runs
    by name."""
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    runtime_params = {
        "mlflow_tracking_uri": tracking_uri,
        **(params or {}),
        "model": {**(params or {}).get("model", {}), "source": str(model_dir)},
    }
    kedro_run(project, pipeline, runtime_params)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("weighted_lowrank")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, "one kedro run is one MLflow parent run"
    children = {
        run.info.run_name: run
        for run in runs
        if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    return SmokeRun(project, model_dir, tracking_uri, parents[0], children)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> SmokeRun:
    project = tmp_path_factory.mktemp("project")
    return run_smoke(project, copy_project(project), "refined")


def test_parent_run_logs_every_parameter_flattened_and_the_fine_tuning_curve(smoke_run):
    params = smoke_run.parent.data.params
    # Typed blocks are mappings, so kedro-mlflow still logs one param per key.
    assert params["model.source"] == str(smoke_run.model_dir)
    assert params["compression.budget"] == "0.1"
    assert params["evaluation.latency.repeats"] == "3"
    assert {"fine_tuning.val_accuracy", "fine_tuning.train_loss", "fine_tuning.seconds"} <= set(
        smoke_run.parent.data.metrics
    )


def test_one_child_run_per_row_with_the_same_names_everywhere(smoke_run):
    children = smoke_run.children
    assert set(children) == {"dense", *SOLVERS, *REFINED}
    dense = children["dense"]
    for name, child in children.items():
        assert set(child.data.metrics) >= COMMON_METRICS, name
        # Dense lacks only the layer groups' iterations (nothing was factorized).
        groups = {metric for metric in child.data.metrics if metric.startswith("iterations.")}
        assert set(child.data.metrics) - groups == set(dense.data.metrics), name
        assert set(child.data.params) == set(dense.data.params), name
        expected = "all, 1 epoch(s)" if name in REFINED else "off"
        assert child.data.params["refinement"] == expected, name
    assert children["svd"].data.metrics["weighted_loss_rel_svd"] == pytest.approx(1.0)
    assert 0.05 < children["als"].data.metrics["params_ratio_layers"] <= 0.1  # smoke budget 0.1
    # A refined model keeps its compressed model's size: only the values were trained.
    assert (
        children["refined.als"].data.metrics["params_kept"]
        == children["als"].data.metrics["params_kept"]
    )


def test_every_output_comes_from_the_one_fine_tuned_model(smoke_run):
    data = smoke_run.project / "data"
    versions = list((data / "06_models" / "fine_tuned_model").iterdir())
    assert len(versions) == 1
    model_dir = versions[0] / "fine_tuned_model"
    assert (model_dir / "model.safetensors").is_file()
    fingerprint = json.loads((model_dir / "lineage.json").read_text())["model_fingerprint"]
    tags = {child.data.tags.get("model_fingerprint") for child in smoke_run.children.values()}
    assert tags == {fingerprint}
    report = pd.read_parquet(data / "07_model_output" / "tfwsvd" / "layer_report.parquet")
    assert set(report["model_fingerprint"]) == {fingerprint}


def test_comparison_has_a_row_per_model_and_refined_models_reload(smoke_run):
    data = smoke_run.project / "data"
    table = pd.read_parquet(data / "08_reporting" / "comparison.parquet")
    assert table["namespace"].tolist() == ["dense", *sorted(SOLVERS), *sorted(REFINED)]
    markdown = (data / "08_reporting" / "comparison.md").read_text()
    assert all(f"| {name} |" in markdown for name in table["namespace"])
    (version,) = (data / "06_models" / "refined" / "svd").iterdir()
    refined = load_compressed(version / "svd")
    assert lowrank_modules(refined)


def test_run_history_reads_refined_rows_beside_their_solver(smoke_run):
    runs = child_runs(smoke_run.tracking_uri)
    assert sorted(runs["solver"]) == sorted(["dense", *SOLVERS, *REFINED])
    summary = budget_table(latest_per_budget(runs, refined_only=True))
    assert list(summary.columns) == [
        ("accuracy", 0.1),
        ("accuracy", 1.0),
        ("accuracy_refined", 0.1),
    ]
    metrics = smoke_run.children
    assert summary.loc["svd", ("accuracy", 0.1)] == metrics["svd"].data.metrics["accuracy"]
    assert (
        summary.loc["svd", ("accuracy_refined", 0.1)]
        == metrics["refined.svd"].data.metrics["accuracy"]
    )


def test_compare_runs_notebook_executes_against_the_store(smoke_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", smoke_run.tracking_uri)
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(smoke_run.project)}},
    ).execute()
    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    summary = outputs[-2]["data"]["text/plain"]
    assert all(solver in summary for solver in SOLVERS)


# ----------------------------------------------------------------------------- predictions, paired


def test_every_row_saves_its_predictions_on_one_test_set_and_logs_them_in_its_child_run(
    smoke_run, tmp_path
):
    folder = smoke_run.project / "data" / "08_reporting" / "predictions"
    client = MlflowClient(smoke_run.tracking_uri)
    frames = {}
    for name in ("dense", *SOLVERS, *REFINED):
        (version,) = (folder / f"{name}.parquet").iterdir()  # versioned: one save so far
        frames[name] = pd.read_parquet(version / f"{name}.parquet")
        child = smoke_run.children[name]
        assert list(frames[name].columns) == [
            "id",
            "label",
            "prediction",
            "loss",
            "logit_0",
            "logit_1",
            "model_fingerprint",
        ]
        assert set(frames[name]["model_fingerprint"]) == {child.data.tags["model_fingerprint"]}
        accuracy = (frames[name]["prediction"] == frames[name]["label"]).mean()
        assert accuracy == pytest.approx(child.data.metrics["accuracy"]), name
        (tmp_path / name).mkdir()
        logged = client.download_artifacts(
            child.info.run_id, "predictions.parquet", str(tmp_path / name)
        )
        pd.testing.assert_frame_equal(pd.read_parquet(logged), frames[name])
    assert client.list_artifacts(smoke_run.parent.info.run_id, "predictions.parquet") == []
    dense = frames["dense"]
    assert dense["id"].tolist() == list(range(64))  # smoke test split
    for name, frame in frames.items():
        assert frame["id"].equals(dense["id"]) and frame["label"].equals(dense["label"]), name


def test_parent_run_and_report_carry_the_paired_tests(smoke_run):
    data = smoke_run.project / "data" / "08_reporting"
    table = pd.read_parquet(data / "comparison.parquet").set_index("namespace")
    metrics = smoke_run.parent.data.metrics
    for reference in ("fwsvd", "svd"):
        for row in table.index:
            name = f"paired.{row}.vs_{reference}"
            if row == reference:
                assert pd.isna(table.at[row, f"vs_{reference}_p"])
                assert f"{name}.p" not in metrics
                continue
            assert 0.0 <= metrics[f"{name}.p"] <= 1.0, name
            assert metrics[f"{name}.p"] == pytest.approx(table.at[row, f"vs_{reference}_p"])
            wins, losses = metrics[f"{name}.wins"], metrics[f"{name}.losses"]
            assert metrics[f"{name}.disagreements"] == wins + losses
            assert metrics[f"{name}.diff"] == pytest.approx(
                table.at[row, "accuracy"] - table.at[reference, "accuracy"]
            )
            assert (
                metrics[f"{name}.ci_low"] <= metrics[f"{name}.diff"] <= metrics[f"{name}.ci_high"]
            )
    markdown = (data / "comparison.md").read_text()
    assert "## Paired tests" in markdown and "| refined.tfwsvd |" in markdown.split("## Paired")[1]


def test_solver_child_runs_show_iterations_and_stop_reasons_per_layer_group(smoke_run):
    children = smoke_run.children
    assert not [name for name in children["dense"].data.metrics if name.startswith("iterations.")]
    names = {}
    for solver in (*SOLVERS, *REFINED):
        child = children[solver]
        names[solver] = sorted(m for m in child.data.metrics if m.startswith("iterations."))
        tags = sorted(t for t in child.data.tags if t.startswith("stop_reason."))
        assert [name.removeprefix("iterations.") for name in names[solver]] == [
            tag.removeprefix("stop_reason.") for tag in tags
        ], solver
    assert len({tuple(value) for value in names.values()}) == 1  # one name set to compare
    report = pd.read_parquet(
        smoke_run.project / "data" / "07_model_output" / "tfwsvd" / "layer_report.parquet"
    )
    groups = report.assign(group=report["shape"])
    for child in (children["tfwsvd"], children["refined.tfwsvd"]):
        for group, rows in groups.groupby("group"):
            assert child.data.metrics[f"iterations.{group}"] == rows["iterations"].max()
            reasons = set(child.data.tags[f"stop_reason.{group}"].split(","))
            if len(set(rows["stop_reason"])) == 1:
                assert reasons == set(rows["stop_reason"])
            else:
                counts = rows["stop_reason"].value_counts()
                assert reasons == {f"{reason}:{count}" for reason, count in counts.items()}
    assert set(
        children["svd"].data.tags[t]
        for t in children["svd"].data.tags
        if t.startswith("stop_reason.")
    ) == {"exact"}
