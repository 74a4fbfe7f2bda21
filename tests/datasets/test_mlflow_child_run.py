"""MlflowChildRunDataset: nested child runs with identical metric names, load of the latest."""

from __future__ import annotations

import mlflow
import pytest
from kedro.io import DatasetError
from mlflow.tracking import MlflowClient

from weighted_lowrank.datasets import MlflowChildRunDataset


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
