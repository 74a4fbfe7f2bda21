"""A Kedro dataset that records one nested MLflow child run per save."""

from __future__ import annotations

from typing import Any

import mlflow
from kedro.io import AbstractDataset, DatasetError
from mlflow.tracking import MlflowClient

ChildRun = dict[str, Any]
"""``{"params": {str: scalar}, "metrics": {str: float}, "tags": {str: str}}`` (tags optional)."""


class MlflowChildRunDataset(AbstractDataset[ChildRun, ChildRun]):
    """Saves params and metrics as a child run nested in the active MLflow run.

    kedro-mlflow opens one run per ``kedro run``; each save here opens a child run named
    ``run_name`` under it, logs the params / metrics / tags and closes it, so the MLflow UI's
    compare view lines the children up (same names in every child). Without an active run the
    child becomes a top-level run of the current experiment. ``load`` returns the latest run of
    that name in the current experiment.

    Example catalog entry (one per solver through a factory pattern)::

        "{solver}.mlflow_run":
          type: weighted_lowrank.datasets.MlflowChildRunDataset
          run_name: "{solver}"
    """

    def __init__(self, run_name: str, metadata: dict[str, Any] | None = None) -> None:
        if not run_name:
            raise ValueError("MlflowChildRunDataset needs a non-empty run_name")
        self._run_name = run_name
        self.metadata = metadata
        self.run_id: str | None = None

    def _describe(self) -> dict[str, Any]:
        return {"run_name": self._run_name}

    def save(self, data: ChildRun) -> None:  # type: ignore[override]
        unknown = set(data) - {"params", "metrics", "tags"}
        if unknown or "metrics" not in data:
            raise DatasetError(
                f"MlflowChildRunDataset({self._run_name!r}) expects a dict with 'metrics' and "
                f"optional 'params'/'tags'; got keys {sorted(data)}"
            )
        metrics = {key: float(value) for key, value in data["metrics"].items()}
        parent = mlflow.active_run()
        tags = {str(key): str(value) for key, value in data.get("tags", {}).items()}
        with mlflow.start_run(
            run_name=self._run_name, nested=parent is not None, tags=tags
        ) as child:
            if data.get("params"):
                mlflow.log_params(data["params"])
            mlflow.log_metrics(metrics)
            self.run_id = child.info.run_id

    def load(self) -> ChildRun:  # type: ignore[override]
        runs = mlflow.search_runs(
            filter_string=f"tags.mlflow.runName = '{self._run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        if not runs:
            raise DatasetError(f"no MLflow run named {self._run_name!r} in the current experiment")
        run = MlflowClient().get_run(runs[0].info.run_id)
        return {
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        }

    def _exists(self) -> bool:
        try:
            self.load()
        except DatasetError:
            return False
        return True
