"""The hook that ends a run which evaluated models with what the user came for: the comparison
as a compact table, then where to look further (the report, the MLflow UI for this store)."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline

#: The catalog entries the summary reads and points to (conf/base/catalog_reporting.yml).
COMPARISON = "comparison_table"
REPORT = "comparison_markdown"


def comparison_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One line per row of the comparison: task metric, share of the model's parameters kept,
    latency relative to dense, and the paired test's p against the first reference row the run
    has."""
    # Imported here: they pull in matplotlib and scipy, and settings.py loads this module.
    from weighted_lowrank.analysis.paired import REFERENCES
    from weighted_lowrank.analysis.run_history import task_metric

    metric = task_metric(table)
    rows = table.set_index("namespace")
    reference = next((name for name in REFERENCES if f"vs_{name}_p" in rows), None)
    summary = pd.DataFrame(
        {
            "row": rows.index,
            metric: rows[metric].round(4).to_numpy(),
            "params kept": rows["params_ratio_model"].round(3).to_numpy(),
            "latency × dense": rows["latency_ratio"].round(2).to_numpy(),
        }
    )
    if reference is not None:
        summary[f"p vs {reference}"] = [_format_p(p) for p in rows[f"vs_{reference}_p"]]
    return summary


def _format_p(p: float) -> str:
    if pd.isna(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


class RunSummary:
    """Prints the comparison after the last node of a run that produced it."""

    def __init__(self) -> None:
        self.report_path: str | None = None

    @hook_impl
    def after_catalog_created(self, conf_catalog: dict[str, Any]) -> None:
        report = conf_catalog.get(REPORT, {})
        self.report_path = report.get("dataset", report).get("filepath")

    @hook_impl
    def after_pipeline_run(self, pipeline: Pipeline, catalog: Any) -> None:
        if COMPARISON not in pipeline.all_outputs():
            return
        from weighted_lowrank.analysis.run_history import markdown_table

        table = comparison_summary(catalog.load(COMPARISON))
        print(
            f"\nCompression results ({len(table)} rows):\n{markdown_table(table)}\n\n"
            f"Full report: {self.report_path}\n"
            f"All runs in MLflow: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}\n",
            flush=True,
        )
