"""One real ``kedro run`` of ``__default__`` (smoke environment) through a KedroSession.

The project's conf/ and embedded data are copied to a temporary project so the run writes
nothing into the checkout; the model is a tiny random BERT saved to a local directory (the smoke
parameters with the embedded MiniLM are exercised by ``kedro run --env smoke``), and MLflow logs
into a temporary sqlite store through the ``mlflow_tracking_uri`` runtime parameter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from tests.conftest import make_tiny_bundle
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.lowrank.surgery import load_compressed, lowrank_modules
from weighted_lowrank.run_history import budget_table, child_runs, latest_per_budget

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture
def tmp_project(tmp_path, monkeypatch):
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    shutil.copytree(
        PROJECT_ROOT / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("local")
    )
    (tmp_path / "conf" / "local").mkdir()
    (tmp_path / "src").mkdir()  # bootstrap_project wants it; the package itself is installed
    shutil.copytree(PROJECT_ROOT / "data" / "01_raw", tmp_path / "data" / "01_raw")
    model_dir = tmp_path / "tiny_model"
    bundle = make_tiny_bundle()
    bundle.model.save_pretrained(model_dir)
    bundle.tokenizer.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    previous_uri = mlflow.get_tracking_uri()
    yield tmp_path, model_dir
    mlflow.set_tracking_uri(previous_uri)


def test_default_pipeline_smoke_run_logs_one_child_per_solver(tmp_project, monkeypatch) -> None:
    project, model_dir = tmp_project
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    bootstrap_project(project)
    with KedroSession.create(
        project_path=project,
        env="smoke",
        runtime_params={
            "mlflow_tracking_uri": tracking_uri,
            "model": {"source": str(model_dir)},
            "refinement": {"enabled": True},
        },
    ) as session:
        session.run()

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("weighted_lowrank")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["model.source"] == str(model_dir)
    assert {"fine_tuning.val_accuracy", "fine_tuning.train_loss", "fine_tuning.seconds"} <= set(
        parent.data.metrics
    )
    children = {
        run.info.run_name: run
        for run in runs
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"dense", *SOLVERS}
    for name, child in children.items():
        assert set(child.data.metrics) >= COMMON_METRICS, name
        assert set(child.data.metrics) == set(children["dense"].data.metrics), name
        assert set(child.data.params) == set(children["dense"].data.params), name
    assert children["svd"].data.metrics["weighted_loss_rel_svd"] == pytest.approx(1.0)
    for name, child in children.items():
        assert {"accuracy_refined", "test_loss_refined", "refinement_seconds"} <= set(
            child.data.metrics
        ), name
        assert child.data.params["refinement"] == "all, 1 epoch(s)", name
    refined_versions = list((project / "data" / "06_models" / "refined" / "svd").iterdir())
    refined = load_compressed(refined_versions[0] / "svd")
    assert lowrank_modules(refined)
    assert 0.05 < children["als"].data.metrics["params_ratio_layers"] <= 0.1  # smoke budget 0.1

    table = pd.read_parquet(project / "data" / "08_reporting" / "comparison.parquet")
    assert table["namespace"].tolist() == ["dense", *sorted(SOLVERS)]
    assert (project / "data" / "08_reporting" / "comparison.md").is_file()
    versions = list((project / "data" / "06_models" / "fine_tuned_model").iterdir())
    assert len(versions) == 1 and (versions[0] / "fine_tuned_model" / "model.safetensors").is_file()

    runs = child_runs(tracking_uri)
    assert sorted(runs["solver"]) == sorted(["dense", *SOLVERS])
    summary = budget_table(latest_per_budget(runs, refined_only=True))
    assert list(summary.columns) == [("accuracy", 0.1), ("accuracy", 1.0)] + [
        ("accuracy_refined", 0.1),
        ("accuracy_refined", 1.0),
    ]
    assert summary.loc["svd", ("accuracy", 0.1)] == children["svd"].data.metrics["accuracy"]

    # notebooks/compare_runs.ipynb executes top to bottom against the smoke run's store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(project)}}
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
    assert outputs[-1]["output_type"] == "display_data" and "image/png" in outputs[-1]["data"]
