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
from weighted_lowrank.lowrank.layer import lowrank_modules
from weighted_lowrank.lowrank.serialization import load_compressed
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.reporting.run_history import (
    budget_table,
    child_runs,
    latest_per_budget,
)

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


def _copy_project(project: Path) -> Path:
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()  # bootstrap_project wants it; the package itself is installed
    shutil.copytree(PROJECT_ROOT / "data" / "01_raw", project / "data" / "01_raw")
    model_dir = project / "tiny_model"
    bundle = make_tiny_bundle()
    bundle.model.save_pretrained(model_dir)
    bundle.tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> SmokeRun:
    project = tmp_path_factory.mktemp("project")
    model_dir = _copy_project(project)
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        bootstrap_project(project)
        runtime_params = {"mlflow_tracking_uri": tracking_uri, "model": {"source": str(model_dir)}}
        with KedroSession.create(
            project_path=project, env="smoke", runtime_params=runtime_params
        ) as session:
            session.run(pipeline_names=["refined"])
    mlflow.set_tracking_uri(previous_uri)
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
        assert set(child.data.metrics) == set(dense.data.metrics), name
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
