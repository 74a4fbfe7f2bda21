"""Read the per-solver MLflow child runs of past ``kedro run``\\ s back as tables and plots.

Used by ``notebooks/compare_runs.ipynb`` and ``benchmarks/results.py``; plain MLflow + pandas, no
Kedro. Every child run (``dense`` and one per solver) carries the same params (``solver``,
``budget``, ``refinement``, …) and metrics (``accuracy``, ``accuracy_refined`` when refined, …).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

EXPERIMENT = "weighted_lowrank"


def child_runs(tracking_uri: str, experiment: str = EXPERIMENT) -> pd.DataFrame:
    """One row per child run: parent run id, start time, every param and metric."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no {experiment!r} experiment in {tracking_uri}: run `kedro run` first")
    runs = client.search_runs([found.experiment_id], max_results=50_000)
    rows = [
        {
            "parent_run": run.data.tags["mlflow.parentRunId"],
            "started": pd.to_datetime(run.info.start_time, unit="ms"),
            **run.data.params,
            **run.data.metrics,
        }
        for run in runs
        if "mlflow.parentRunId" in run.data.tags and "solver" in run.data.params
    ]
    if not rows:
        raise ValueError(
            f"no per-solver child runs in {tracking_uri}: run the whole pipeline (`kedro run`)"
        )
    table = pd.DataFrame(rows)
    table["budget"] = table["budget"].astype(float)
    # Runs recorded before the refinement pipeline existed have no such param.
    refinement = table["refinement"] if "refinement" in table else pd.Series("off", table.index)
    table["refinement"] = refinement.fillna("off")
    return table.sort_values(["budget", "solver", "started"], ignore_index=True)


def task_metric(table: pd.DataFrame) -> str:
    """``accuracy`` for classification runs, ``pearson`` for regression."""
    return "accuracy" if "accuracy" in table else "pearson"


def latest_per_budget(table: pd.DataFrame, refined_only: bool = False) -> pd.DataFrame:
    """The newest child run of every (solver, budget); ``refined_only`` keeps refined runs only.

    ``dense`` (budget 1) is taken from the newest parent run that also holds the kept solver runs,
    so the reference line belongs to the same fine-tuned model.
    """
    if refined_only:
        table = table[table["refinement"] != "off"]
        if table.empty:
            raise ValueError("no child runs with refinement: run with refinement.enabled=true")
    solvers = table[table["solver"] != "dense"]
    latest = solvers.sort_values("started").groupby(["solver", "budget"], as_index=False).last()
    dense = table[(table["solver"] == "dense") & table["parent_run"].isin(latest["parent_run"])]
    return pd.concat([dense.sort_values("started").tail(1), latest], ignore_index=True)


def budget_table(latest: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Solver × budget of the task metric, and of ``<metric>_refined`` where it was measured."""
    metric = metric or task_metric(latest)
    values = [name for name in (metric, f"{metric}_refined") if name in latest]
    table = latest.pivot_table(index="solver", columns="budget", values=values, aggfunc="last")
    order = ["dense"] + sorted(name for name in table.index if name != "dense")
    return table.reindex([name for name in order if name in table.index])


def quality_vs_params_figure(latest: pd.DataFrame, metric: str | None = None) -> Figure:
    """Task metric vs whole-model parameters kept, one line per solver across budgets.

    Dense is a dashed reference line; where refined metrics exist each solver also gets a dotted
    line of the same colour for its models fine-tuned after compression.
    """
    metric = metric or task_metric(latest)
    refined = f"{metric}_refined"
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    dense = latest[latest["solver"] == "dense"]
    if not dense.empty:
        axis.axhline(dense[metric].iloc[-1], color="black", linestyle="--", label="dense")
    for solver, group in latest[latest["solver"] != "dense"].groupby("solver"):
        group = group.sort_values("params_ratio_model")
        (line,) = axis.plot(group["params_ratio_model"], group[metric], marker="o", label=solver)
        if refined in group and group[refined].notna().any():
            axis.plot(
                group["params_ratio_model"],
                group[refined],
                marker="s",
                markerfacecolor="none",
                linestyle=":",
                color=line.get_color(),
                label=f"{solver} refined",
            )
    axis.set_xlabel("parameters kept (whole model, fraction of dense)")
    axis.set_ylabel(f"test {metric}")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure
