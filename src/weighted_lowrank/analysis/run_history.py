"""Read the per-row MLflow child runs of past runs back as tables and plots (plain MLflow +
pandas). Every child run has the same params and metrics; its ``solver`` is the row's namespace
(``dense``, a solver, or ``refined.<solver>``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from .paired import discordant_counts, mcnemar_exact_p

EXPERIMENT = "weighted_lowrank"
#: Namespace prefix of the rows of models fine-tuned after compression.
REFINED_PREFIX = "refined."
_SUFFIX = "_refined"
PREDICTIONS_ARTIFACT = "predictions.parquet"


def is_refined(solver: str) -> bool:
    """Whether a row is a model fine-tuned after compression."""
    return solver.startswith(REFINED_PREFIX)


def base_solver(solver: str) -> str:
    """The solver a row's model was compressed by: ``svd`` for ``refined.svd`` and ``svd``."""
    return solver.removeprefix(REFINED_PREFIX)


def _all_runs(tracking_uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no {experiment!r} experiment in {tracking_uri}: run `kedro run` first")
    return client.search_runs([found.experiment_id], max_results=50_000)


def child_runs(tracking_uri: str, experiment: str = EXPERIMENT) -> pd.DataFrame:
    """One row per child run: parent run id, run id, start time, every param and metric."""
    rows = [
        {
            "parent_run": run.data.tags["mlflow.parentRunId"],
            "run_id": run.info.run_id,
            "started": pd.to_datetime(run.info.start_time, unit="ms"),
            **run.data.params,
            **run.data.metrics,
        }
        for run in _all_runs(tracking_uri, experiment)
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
    # Runs recorded before the allocation param existed spread the budget uniformly.
    allocation = table["allocation"] if "allocation" in table else pd.Series(None, table.index)
    default = np.where(table["solver"] == "dense", "dense", "uniform")
    table["allocation"] = allocation.where(allocation.notna(), default)
    table = _split_refined_metrics(table)
    return table.sort_values(["budget", "solver", "started"], ignore_index=True)


def _split_refined_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Runs recorded before refined rows existed, as if they had them: a solver row's
    ``<metric>_refined`` metrics become a ``refined.<solver>`` row's."""
    suffixed = [column for column in table.columns if column.endswith(_SUFFIX)]
    if not suffixed:
        return table
    base = ~table["solver"].map(is_refined)
    old = table[suffixed].notna().any(axis=1) & base & (table["solver"] != "dense")
    refined = table[old].copy()
    for column in suffixed:
        refined[column.removesuffix(_SUFFIX)] = refined[column]
    refined["solver"] = REFINED_PREFIX + refined["solver"]
    # Not runs of their own: the run's artifacts are the unrefined model's.
    refined["run_id"] = None
    table = table.copy()
    table.loc[base, "refinement"] = "off"
    combined = pd.concat([table, refined], ignore_index=True)
    return combined.drop(columns=[*suffixed, "refinement_seconds"], errors="ignore")


def task_metric(table: pd.DataFrame) -> str:
    """``accuracy`` (classification), ``perplexity`` (language models), else ``pearson``."""
    return next((metric for metric in ("accuracy", "perplexity") if metric in table), "pearson")


def latest_per_budget(table: pd.DataFrame, refined_only: bool = False) -> pd.DataFrame:
    """The newest child run of every (solver, budget) (``refined_only``: only the pairs that have
    a refined row), and ``dense`` of the newest parent run among those kept (same model)."""
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
    """The unrefined rows, each with its ``refined.<solver>`` row's numeric metrics as
    ``<metric>_refined`` (NaN where it has none)."""
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
    """Task metric vs whole-model parameters kept, one line per solver across budgets."""
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


def latest_per_seed(table: pd.DataFrame) -> pd.DataFrame:
    """The newest child run of every (solver, budget, allocation, seed), dense included."""
    if "seed" not in table:
        raise ValueError("the child runs carry no `seed` param; run the pipeline (`kedro run`)")
    keyed = table.assign(seed=table["seed"].astype(int))
    return (
        keyed.sort_values("started")
        .groupby(["solver", "budget", "allocation", "seed"], as_index=False)
        .last()
        .sort_values(["budget", "solver", "allocation", "seed"], ignore_index=True)
    )


def seed_summary(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """``n``, mean and sample sd of the task metric over seeds per (solver, budget, allocation),
    dense first."""
    metric = metric or task_metric(table)
    grouped = table.groupby(["solver", "budget", "allocation"])[metric]
    summary = grouped.agg(n="count", mean="mean", sd="std").reset_index()
    return (
        summary.assign(_order=summary["solver"].ne("dense"))
        .sort_values(["_order", "budget", "solver", "allocation"])
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def seed_differences(
    table: pd.DataFrame, reference: str = "fwsvd", metric: str | None = None
) -> pd.DataFrame:
    """Per (solver, budget, allocation): the task metric minus ``reference``'s at the same seed
    (:func:`_paired_summary`'s columns)."""
    metric = metric or task_metric(table)
    wide = table.pivot_table(
        index=["budget", "allocation", "seed"], columns="solver", values=metric
    )
    if reference not in wide:
        raise ValueError(f"no {reference!r} child runs to compare against")
    rows = []
    for solver in sorted(set(wide.columns) - {reference, "dense"}):
        differences = wide[solver] - wide[reference]
        for (budget, allocation), group in differences.groupby(level=["budget", "allocation"]):
            values = group.dropna().droplevel(["budget", "allocation"])
            if not values.empty:
                key = {"solver": solver, "budget": budget, "allocation": allocation}
                rows.append({**key, **_paired_summary(values)})
    return pd.DataFrame(rows)


def allocation_differences(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Per (solver, budget) with both allocations at a seed: global − uniform of the task metric
    (:func:`_paired_summary`'s columns) and of ``test_loss`` (``loss_*``)."""
    metric = metric or task_metric(table)
    index = ["solver", "budget", "seed"]
    wide = table.pivot_table(index=index, columns="allocation", values=[metric, "test_loss"])
    rows = []
    if {(metric, "global"), (metric, "uniform")} <= set(wide.columns):
        both = wide[wide[(metric, "global")].notna() & wide[(metric, "uniform")].notna()]
        for (solver, budget), group in both.groupby(level=["solver", "budget"]):
            group = group.droplevel(["solver", "budget"])
            summary = _paired_summary(group[(metric, "global")] - group[(metric, "uniform")])
            losses = group[("test_loss", "global")] - group[("test_loss", "uniform")]
            loss = {"loss_mean_diff": losses.mean(), "loss_differences": _by_seed(losses)}
            rows.append({"solver": solver, "budget": budget, **summary, **loss})
    return pd.DataFrame(rows)


def _paired_summary(values: pd.Series) -> dict[str, Any]:
    """n, mean and sd of per-seed differences (index: seed), how many are > 0, and the values."""
    return {
        "n": len(values),
        "mean_diff": values.mean(),
        "sd_diff": values.std(),
        "ahead": int((values > 0).sum()),
        "differences": _by_seed(values),
    }


def _by_seed(values: pd.Series) -> dict[int, float]:
    return {int(seed): float(value) for seed, value in values.items()}


def paired_p_values(
    tracking_uri: str, reference: str = "fwsvd", experiment: str = EXPERIMENT
) -> pd.DataFrame:
    """The McNemar p of every row against ``reference`` per (seed, budget, allocation) as the
    newest parent run logged it (``paired.<row>.vs_<reference>.p``; no allocation: uniform)."""
    prefix, suffix = "paired.", f".vs_{reference}.p"
    rows = [
        {
            "solver": name[len(prefix) : -len(suffix)],
            "budget": float(run.data.params["compression.budget"]),
            "allocation": run.data.params.get("compression.allocation", "uniform"),
            "seed": int(run.data.params["seed"]),
            "started": run.info.start_time,
            "p": value,
        }
        for run in _all_runs(tracking_uri, experiment)
        if "mlflow.parentRunId" not in run.data.tags and "seed" in run.data.params
        for name, value in run.data.metrics.items()
        if name.startswith(prefix) and name.endswith(suffix)
    ]
    columns = ["solver", "budget", "allocation", "seed", "p"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows).sort_values("started")
    return table.groupby(columns[:-1], as_index=False).last()[columns]


def allocation_p_values(tracking_uri: str, table: pd.DataFrame) -> pd.DataFrame:
    """The McNemar p of global against uniform allocation per (solver, budget, seed), from the
    child runs' predictions (no row where a pair cannot be compared)."""
    client = MlflowClient(tracking_uri)
    keyed = table[table["allocation"].isin(["uniform", "global"])]
    run_ids = keyed.set_index(["solver", "budget", "seed", "allocation"])["run_id"].unstack()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for (solver, budget, seed), ids in run_ids.iterrows():
            tables = [
                _logged_predictions(client, ids.get(allocation), Path(directory))
                for allocation in ("global", "uniform")
            ]
            correct = _correct_on_one_test_set(*tables)
            if correct is None:
                continue
            wins, losses = discordant_counts(*correct)
            rows.append((solver, budget, seed, wins, losses, mcnemar_exact_p(wins, losses)))
    return pd.DataFrame(rows, columns=["solver", "budget", "seed", "wins", "losses", "p"])


def _logged_predictions(
    client: MlflowClient, run_id: str | None, directory: Path
) -> pd.DataFrame | None:
    if not isinstance(run_id, str):
        return None
    if PREDICTIONS_ARTIFACT not in {item.path for item in client.list_artifacts(run_id)}:
        return None
    local = directory / run_id
    local.mkdir(exist_ok=True)
    return pd.read_parquet(client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, str(local)))


def _correct_on_one_test_set(
    first: pd.DataFrame | None, second: pd.DataFrame | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-example correctness of two classifiers' predictions on one test set, else None."""
    if first is None or second is None:
        return None
    first, second = (table.sort_values("id", ignore_index=True) for table in (first, second))
    classification = all(
        {"prediction", "label"} <= set(table.columns)
        and pd.api.types.is_integer_dtype(table["prediction"])
        for table in (first, second)
    )
    if not classification or test_set_differences({"global": first, "uniform": second}):
        return None
    return tuple((table["prediction"] == table["label"]).to_numpy() for table in (first, second))


def test_set_differences(tables: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Per predictions table (sorted by id) not on the first's test set, why: other ids or labels
    (a language model's: tokens)."""
    names = list(tables)
    first = tables[names[0]]
    key = "label" if "label" in first.columns else "tokens"
    ids, labels = first["id"].to_numpy(), first[key].to_numpy()
    differing = {}
    for name in names[1:]:
        table = tables[name]
        if len(table) != len(first):
            differing[name] = f"{len(table)} examples, not {len(first)}"
        elif not np.array_equal(table["id"].to_numpy(), ids):
            differing[name] = "other example ids"
        elif key not in table.columns:
            differing[name] = f"no {key} column"
        elif not np.array_equal(table[key].to_numpy(), labels):
            count = int(np.count_nonzero(table[key].to_numpy() != labels))
            differing[name] = f"{count} {key}s differ" if key == "label" else f"other {key}"
    return differing


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (floats to 4 significant digits)."""
    rows = [
        [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        for row in table.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
