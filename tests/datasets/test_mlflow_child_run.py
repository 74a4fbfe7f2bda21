"""MlflowChildRunDataset: nested child runs with identical metric names, load of the latest."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from kedro.io import DatasetError
from mlflow.tracking import MlflowClient

from weighted_lowrank.kedro_glue.datasets import MlflowChildRunDataset


@pytest.fixture(scope="module")
def tmp_store(tmp_path_factory):
    # One sqlite store per module: creating its schema costs seconds.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    yield MlflowClient()
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def tmp_tracking(tmp_store, request):
    mlflow.set_experiment(request.node.name)
    return tmp_store


def test_children_nest_under_the_active_run(tmp_tracking) -> None:
    with mlflow.start_run(run_name="parent") as parent:
        for solver, accuracy in (("svd", 0.7), ("als", 0.8)):
            MlflowChildRunDataset(run_name=solver).save(
                {
                    "params": {"solver": solver, "budget": 0.5},
                    "metrics": {"accuracy": accuracy},
                    "tags": {"kind": "solver"},
                }
            )
        assert mlflow.active_run().info.run_id == parent.info.run_id
    children = tmp_tracking.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"svd", "als"}
    assert by_name["als"].data.metrics == {"accuracy": 0.8}
    assert by_name["svd"].data.params == {"solver": "svd", "budget": "0.5"}
    assert by_name["svd"].data.tags["kind"] == "solver"


def test_load_returns_latest_run_of_that_name(tmp_tracking) -> None:
    dataset = MlflowChildRunDataset(run_name="em")
    assert not dataset.exists()
    dataset.save({"metrics": {"accuracy": 0.5}})
    dataset.save({"metrics": {"accuracy": 0.6}})
    assert dataset.load()["metrics"] == {"accuracy": 0.6}
    assert dataset.exists()


def test_malformed_payload_is_rejected(tmp_tracking) -> None:
    with pytest.raises(DatasetError, match="expects a dict with 'metrics'"):
        MlflowChildRunDataset(run_name="x").save({"params": {"a": 1}})
    for artifacts, message in (
        ({"/abs.txt": "x"}, "must be relative"),
        ({"../up.txt": "x"}, "must be relative"),
        ({"table.csv": pd.DataFrame({"a": [1]})}, "must end in .parquet"),
        ({"n.txt": 3}, "expected a DataFrame, str or bytes"),
    ):
        with pytest.raises(DatasetError, match=message):
            MlflowChildRunDataset(run_name="x").save({"metrics": {}, "artifacts": artifacts})


def test_artifacts_land_in_the_child_run_not_the_parent(tmp_store, tmp_path) -> None:
    experiment = tmp_store.create_experiment(
        "artifacts", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment)
    table = pd.DataFrame({"id": [0, 1, 2], "label": [1, 0, 1], "prediction": [1, 1, 1]})
    with mlflow.start_run(run_name="parent") as parent:
        dataset = MlflowChildRunDataset(run_name="svd")
        dataset.save(
            {
                "metrics": {"accuracy": 2 / 3},
                "artifacts": {"predictions.parquet": table, "notes/why.txt": "paired"},
            }
        )
    child = dataset.run_id
    assert child != parent.info.run_id
    assert {item.path for item in tmp_store.list_artifacts(child)} == {
        "predictions.parquet",
        "notes",
    }
    assert tmp_store.list_artifacts(parent.info.run_id) == []
    local = tmp_store.download_artifacts(child, "predictions.parquet", str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_parquet(local), table)
    notes = tmp_store.download_artifacts(child, "notes/why.txt", str(tmp_path))
    assert open(notes, encoding="utf-8").read() == "paired"
