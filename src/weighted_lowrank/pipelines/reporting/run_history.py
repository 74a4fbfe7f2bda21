"""Read the per-row MLflow child runs of past ``kedro run``\\ s back as tables and plots.

Used by ``notebooks/compare_runs.ipynb`` and ``benchmarks/results.py``; plain MLflow + pandas, no
Kedro. Every child run carries the same params (``solver``, ``budget``, ``refinement``, …) and
metrics (``accuracy``, ``latency_ms``, …). Its ``solver`` is the row's namespace: ``dense``, a
solver, or ``refined.<solver>`` for that solver's model fine-tuned after compression (``kedro run
--pipelines refined``, or ``--pipelines refinement`` after a run), whose ``refinement`` param says
what was trained; every other row says ``off``. :func:`with_refined_columns` puts a refined row's
metrics beside its solver's as ``<metric>_refined``, the way the tables and plots show them.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

EXPERIMENT = "weighted_lowrank"
#: Namespace (and ``solver`` param) prefix of the rows of models fine-tuned after compression.
REFINED_PREFIX = "refined."
_SUFFIX = "_refined"


def is_refined(solver: str) -> bool:
    """Whether a row (namespace / ``solver`` param) is a model fine-tuned after compression."""
    return solver.startswith(REFINED_PREFIX)


def base_solver(solver: str) -> str:
    """The solver a row's model was compressed by: ``svd`` for ``refined.svd`` and ``svd``."""
    return solver.removeprefix(REFINED_PREFIX)


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
    table = _split_refined_metrics(table)
    return table.sort_values(["budget", "solver", "started"], ignore_index=True)


def _split_refined_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Runs recorded before refined rows existed, as if they had them.

    Such a run measured its refined model in ``<metric>_refined`` metrics (and
    ``refinement_seconds``) of the solver's own child run. Each becomes a ``refined.<solver>`` row
    with those values under the plain names (the size and latency metrics are the solver's: the
    refined model has its layers) and the solver's row keeps the unrefined metrics, ``refinement``
    ``off``.
    """
    suffixed = [column for column in table.columns if column.endswith(_SUFFIX)]
    if not suffixed:
        return table
    base = ~table["solver"].map(is_refined)
    old = table[suffixed].notna().any(axis=1) & base & (table["solver"] != "dense")
    refined = table[old].copy()
    for column in suffixed:
        refined[column.removesuffix(_SUFFIX)] = refined[column]
    refined["solver"] = REFINED_PREFIX + refined["solver"]
    table = table.copy()
    table.loc[base, "refinement"] = "off"
    combined = pd.concat([table, refined], ignore_index=True)
    return combined.drop(columns=[*suffixed, "refinement_seconds"], errors="ignore")


def task_metric(table: pd.DataFrame) -> str:
    """``accuracy`` for classification runs, ``pearson`` for regression."""
    return "accuracy" if "accuracy" in table else "pearson"


def latest_per_budget(table: pd.DataFrame, refined_only: bool = False) -> pd.DataFrame:
    """The newest child run of every (solver, budget), refined rows included.

    ``refined_only`` keeps the (solver, budget) pairs that have a refined row: those rows and
    their solver's. ``dense`` (budget 1) is taken from the newest parent run that also holds kept
    runs, so the reference line belongs to the same fine-tuned model.
    """
    refined = table["solver"].map(is_refined)
    if refined_only:
        if not refined.any():
            raise ValueError(
                "no refined child runs: run `kedro run --pipelines refined` (or `kedro run "
                "--pipelines refinement` after a run)"
            )
        rows = table[refined]
        pairs = pd.MultiIndex.from_arrays([rows["solver"].map(base_solver), rows["budget"]])
        solver = pd.MultiIndex.from_arrays([table["solver"], table["budget"]]).isin(pairs)
        table = table[refined | (table["solver"] == "dense") | solver]
    solvers = table[table["solver"] != "dense"]
    latest = solvers.sort_values("started").groupby(["solver", "budget"], as_index=False).last()
    dense = table[(table["solver"] == "dense") & table["parent_run"].isin(latest["parent_run"])]
    return pd.concat([dense.sort_values("started").tail(1), latest], ignore_index=True)


def with_refined_columns(latest: pd.DataFrame) -> pd.DataFrame:
    """The unrefined rows, each with its ``refined.<solver>`` row's metrics as ``<metric>_refined``.

    Metrics are the numeric columns (``budget`` is the key); a row without a refined row has NaN
    there, and without any refined row the table is returned as it is.
    """
    refined = latest["solver"].map(is_refined)
    base = latest[~refined]
    if not refined.any():
        return base.reset_index(drop=True)
    metrics = [
        column
        for column in latest.select_dtypes("number").columns
        if column != "budget" and latest.loc[refined, column].notna().any()
    ]
    suffixed = latest.loc[refined, ["solver", "budget", *metrics]].rename(
        columns={metric: f"{metric}{_SUFFIX}" for metric in metrics}
    )
    suffixed["solver"] = suffixed["solver"].map(base_solver)
    return base.merge(suffixed, on=["solver", "budget"], how="left")


def budget_table(latest: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Solver × budget of the task metric, and of ``<metric>_refined`` where it was measured."""
    metric = metric or task_metric(latest)
    wide = with_refined_columns(latest)
    values = [name for name in (metric, f"{metric}{_SUFFIX}") if name in wide]
    table = wide.pivot_table(index="solver", columns="budget", values=values, aggfunc="last")
    order = ["dense"] + sorted(name for name in table.index if name != "dense")
    return table.reindex([name for name in order if name in table.index])


def quality_vs_params_figure(latest: pd.DataFrame, metric: str | None = None) -> Figure:
    """Task metric vs whole-model parameters kept, one line per solver across budgets.

    Dense is a dashed reference line; where refined rows exist each solver also gets a dotted
    line of the same colour for its models fine-tuned after compression.
    """
    metric = metric or task_metric(latest)
    wide = with_refined_columns(latest)
    refined = f"{metric}{_SUFFIX}"
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    dense = wide[wide["solver"] == "dense"]
    if not dense.empty:
        axis.axhline(dense[metric].iloc[-1], color="black", linestyle="--", label="dense")
    for solver, group in wide[wide["solver"] != "dense"].groupby("solver"):
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


# ----------------------------------------------------------------------------- across seeds


def latest_per_seed(table: pd.DataFrame) -> pd.DataFrame:
    """The newest child run of every (solver, budget, seed), dense (budget 1) included.

    A seed sweep (``python -m weighted_lowrank.sweep run``) makes one parent run per seed and
    budget; re-running a seed replaces its rows.
    """
    if "seed" not in table:
        raise ValueError("the child runs carry no `seed` param; run the pipeline (`kedro run`)")
    keyed = table.assign(seed=table["seed"].astype(int))
    return (
        keyed.sort_values("started")
        .groupby(["solver", "budget", "seed"], as_index=False)
        .last()
        .sort_values(["budget", "solver", "seed"], ignore_index=True)
    )


def seed_summary(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Mean ± sd of the task metric over seeds, per (solver, budget); ``n`` seeds each.

    ``table`` is :func:`latest_per_seed`'s; sd is the sample standard deviation (NaN for one seed).
    """
    metric = metric or task_metric(table)
    grouped = table.groupby(["solver", "budget"])[metric]
    summary = grouped.agg(n="count", mean="mean", sd="std").reset_index()
    return _dense_first(summary)


def seed_differences(
    table: pd.DataFrame, reference: str = "fwsvd", metric: str | None = None
) -> pd.DataFrame:
    """Per (solver, budget): the per-seed differences of the task metric against ``reference``
    at the same seed and budget (paired by seed), their mean and sd, and on how many seeds the
    solver was ahead.

    Columns: solver, budget, n, mean_diff, sd_diff, ahead, differences (seed → difference).
    """
    metric = metric or task_metric(table)
    wide = table.pivot_table(index=["budget", "seed"], columns="solver", values=metric)
    if reference not in wide:
        raise ValueError(f"no {reference!r} child runs to compare against")
    rows = []
    for solver in sorted(set(wide.columns) - {reference, "dense"}):
        for budget, group in (wide[solver] - wide[reference]).groupby(level="budget"):
            values = group.dropna().droplevel("budget")
            if values.empty:
                continue
            rows.append(
                {
                    "solver": solver,
                    "budget": budget,
                    "n": len(values),
                    "mean_diff": values.mean(),
                    "sd_diff": values.std(),
                    "ahead": int((values > 0).sum()),
                    "differences": {int(seed): float(value) for seed, value in values.items()},
                }
            )
    return pd.DataFrame(rows)


def paired_p_values(
    tracking_uri: str, reference: str = "fwsvd", experiment: str = EXPERIMENT
) -> pd.DataFrame:
    """The exact McNemar p of every row against ``reference`` per (seed, budget), as each run's
    parent logged it (``paired.<row>.vs_<reference>.p``); the newest parent run of a (seed,
    budget) wins. Columns: solver, budget, seed, p."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no {experiment!r} experiment in {tracking_uri}: run `kedro run` first")
    prefix, suffix = "paired.", f".vs_{reference}.p"
    rows = [
        {
            "solver": name[len(prefix) : -len(suffix)],
            "budget": float(run.data.params["compression.budget"]),
            "seed": int(run.data.params["seed"]),
            "started": run.info.start_time,
            "p": value,
        }
        for run in client.search_runs([found.experiment_id], max_results=50_000)
        if "mlflow.parentRunId" not in run.data.tags and "seed" in run.data.params
        for name, value in run.data.metrics.items()
        if name.startswith(prefix) and name.endswith(suffix)
    ]
    columns = ["solver", "budget", "seed", "p"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows).sort_values("started")
    return table.groupby(["solver", "budget", "seed"], as_index=False).last()[columns]


def _dense_first(table: pd.DataFrame) -> pd.DataFrame:
    order = table["solver"].ne("dense")
    return (
        table.assign(_order=order)
        .sort_values(["_order", "budget", "solver"])
        .drop(columns="_order")
        .reset_index(drop=True)
    )
