"""A Kedro dataset that records one nested MLflow child run per save."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import pandas as pd
from kedro.io import AbstractDataset, DatasetError
from mlflow.tracking import MlflowClient

#: ``{"params", "metrics", "tags", "artifacts": {relative path: DataFrame | str | bytes}}``.
ChildRun = dict[str, Any]


class MlflowChildRunDataset(AbstractDataset[ChildRun, ChildRun]):
    """Saves params, metrics, tags and artifacts as a child run ``run_name`` nested in the active
    MLflow run (kedro-mlflow's one per ``kedro run``; without one, a top-level run), so the MLflow
    UI's compare view lines the children up. An artifact is a relative POSIX path mapped to a
    DataFrame (Parquet: the path ends in ``.parquet``), a str (UTF-8) or bytes. ``load`` returns
    the params, metrics and tags of the latest run of that name. Example catalog entry::

        "{solver}.mlflow_run":
          type: weighted_lowrank.kedro_glue.datasets.MlflowChildRunDataset
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
        unknown = set(data) - {"params", "metrics", "tags", "artifacts"}
        if unknown or "metrics" not in data:
            raise DatasetError(
                f"MlflowChildRunDataset({self._run_name!r}) expects a dict with 'metrics' and "
                f"optional 'params'/'tags'/'artifacts'; got keys {sorted(data)}"
            )
        artifacts = dict(data.get("artifacts") or {})
        for path, value in artifacts.items():
            _check_artifact(self._run_name, path, value)
        metrics = {key: float(value) for key, value in data["metrics"].items()}
        tags = {str(key): str(value) for key, value in data.get("tags", {}).items()}
        nested = mlflow.active_run() is not None  # without kedro-mlflow's run: a top-level one
        with mlflow.start_run(run_name=self._run_name, nested=nested, tags=tags) as child:
            if data.get("params"):
                mlflow.log_params(data["params"])
            mlflow.log_metrics(metrics)
            if artifacts:
                _log_artifacts(artifacts)
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


def _check_artifact(run_name: str, path: str, value: Any) -> None:
    relative = PurePosixPath(path)
    problem = None
    if not path or relative.is_absolute() or ".." in relative.parts:
        problem = "must be relative"
    elif isinstance(value, pd.DataFrame) and relative.suffix != ".parquet":
        problem = "is a table: it must end in .parquet"
    elif not isinstance(value, pd.DataFrame | str | bytes):
        problem = f"is a {type(value).__name__}; expected a DataFrame, str or bytes"
    if problem is not None:
        raise DatasetError(f"MlflowChildRunDataset({run_name!r}): artifact {path!r} {problem}")


def _log_artifacts(artifacts: dict[str, pd.DataFrame | str | bytes]) -> None:
    """Log each artifact into the active run at its relative path."""
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        for path, value in artifacts.items():
            local = root / path
            local.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, pd.DataFrame):
                value.to_parquet(local, index=False)
            elif isinstance(value, str):
                local.write_text(value, encoding="utf-8")
            else:
                local.write_bytes(value)
        mlflow.log_artifacts(directory)
