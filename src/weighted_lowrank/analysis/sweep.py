"""Seed sweeps: the default run for several seeds, budgets and allocations, and the comparison
across seeds.

``run`` runs, per seed, the whole default pipeline at the first (budget, allocation) pair, then
every other pair from :data:`RESTART_NODES`; the data split stays the configured one, so every
model is scored on the same test sentences. Runs that differ in another setting belong in their
own store (``--tracking-uri``): the report keys rows by solver, budget, allocation and seed only.
``report`` prints the task metric's mean ± sd over seeds, the per-seed paired differences against
``fwsvd``, and global − uniform, as Markdown.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from weighted_lowrank.analysis.run_history import (
    allocation_differences,
    allocation_p_values,
    child_runs,
    latest_per_seed,
    markdown_table,
    paired_p_values,
    seed_differences,
    seed_summary,
    task_metric,
)
from weighted_lowrank.kedro_glue.parameters import ALLOCATIONS

#: Where a sweep's later (budget, allocation) pairs restart: every node that reads the budget or
#: the allocation is one of these or downstream.
RESTART_NODES: tuple[str, ...] = ("svd_reference", "compute_layer_risk")


def run_sweep(
    seeds: Sequence[int],
    budgets: Sequence[float],
    *,
    allocations: Sequence[str] = ("uniform",),
    project_path: Path,
    env: str | None = None,
    pipeline: str = "__default__",
    runtime_params: dict[str, Any] | None = None,
) -> None:
    """One Kedro session per (seed, budget, allocation)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project_path)
    extra = dict(runtime_params or {})
    with KedroSession.create(project_path=project_path, env=env, runtime_params=extra) as session:
        split_seed = session.load_context().params["data"].split.seed
    pairs = [(budget, allocation) for budget in budgets for allocation in allocations]
    for seed in seeds:
        for index, (budget, allocation) in enumerate(pairs):
            overrides = _deep_merge(
                extra,
                {
                    "seed": seed,
                    "compression": {"budget": budget, "allocation": allocation},
                    "data": {"split": {"seed": split_seed}},
                },
            )
            with KedroSession.create(
                project_path=project_path, env=env, runtime_params=overrides
            ) as session:
                session.run(
                    pipeline_names=[pipeline],
                    from_nodes=None if index == 0 else list(RESTART_NODES),
                )
            end_active_runs()


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, nested blocks key by key (as Kedro merges --params)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["dotted.key=value", ...]`` → a nested dict, values parsed as YAML by OmegaConf (as
    ``kedro run --params``, but one item per argument, so a value may hold commas)."""
    from omegaconf import OmegaConf

    malformed = [item for item in items if "=" not in item or not item.partition("=")[0].strip()]
    if malformed:
        raise ValueError(f"--params items {malformed} are not 'dotted.key=value'")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)))


def end_active_runs() -> None:
    """Close every MLflow run this process still holds open: kedro-mlflow 2.0.3 leaves the parent
    run open, and the next session would log into it instead of starting its own."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def sweep_report(tracking_uri: str, reference: str = "fwsvd") -> str:
    runs = latest_per_seed(child_runs(tracking_uri))
    metric = task_metric(runs)
    lines = [
        f"## Test {metric} over seeds (mean ± sd)",
        "",
        _summary_markdown(seed_summary(runs, metric)),
        "",
        f"## Paired by seed: {metric} − {reference}'s at the same seed, budget and allocation",
        "",
        _reference_markdown(tracking_uri, runs, reference, metric),
        "",
        "## global − uniform, paired by seed",
        "",
        _allocation_markdown(tracking_uri, runs, metric),
    ]
    return "\n".join(lines) + "\n"


def _summary_markdown(summary: pd.DataFrame) -> str:
    cells = summary.assign(
        value=[
            f"{row.mean:.4f} ± {row.sd:.4f} (n={row.n})" if row.n > 1 else f"{row.mean:.4f} (n=1)"
            for row in summary.itertuples()
        ]
    )
    wide = cells.pivot(index=["solver", "allocation"], columns="budget", values="value")
    allocations = ["dense", *ALLOCATIONS]
    order = sorted(
        wide.index,
        key=lambda key: (key[0] != "dense", key[0], allocations.index(key[1])),
    )
    wide = wide.reindex(order).dropna(how="all")
    wide.columns = [f"budget {budget:g}" for budget in wide.columns]
    return markdown_table(wide.fillna("").reset_index())


def _reference_markdown(tracking_uri: str, runs: pd.DataFrame, reference: str, metric: str) -> str:
    differences = seed_differences(runs, reference, metric)
    if differences.empty:
        return f"(no {reference!r} rows to pair with)"
    keys = ["solver", "budget", "allocation"]
    p_values = paired_p_values(tracking_uri, reference).set_index([*keys, "seed"])
    return (
        _differences_table(differences, p_values, keys)
        + "\n\n"
        + f"`mcnemar_p`: per seed, the exact McNemar test of the row against {reference} on the "
        "shared test sentences (the run's paired tests)."
    )


def _allocation_markdown(tracking_uri: str, runs: pd.DataFrame, metric: str) -> str:
    differences = allocation_differences(runs, metric)
    if differences.empty:
        return (
            "(no solver and budget ran with both allocations at one seed: `python -m "
            "weighted_lowrank.analysis.sweep run --allocations uniform global`)"
        )
    p_values = allocation_p_values(tracking_uri, runs).set_index(["solver", "budget", "seed"])
    table = _differences_table(
        differences,
        p_values,
        ["solver", "budget"],
        loss_differences=differences["loss_differences"].map(_by_seed),
    )
    return (
        table
        + "\n\n"
        + f"Per seed, the global allocation's {metric} (`mean_diff`, `differences`; `ahead`: "
        "seeds where global's is higher) and test_loss (`loss_mean_diff`, `loss_differences`; "
        "lower is better) minus the uniform allocation's at the same seed and budget. "
        "`mcnemar_p`: per seed, the exact McNemar test of the two models on the shared test "
        "sentences, from their child runs' predictions (none where a run has no predictions)."
    )


def _differences_table(
    differences: pd.DataFrame, p_values: pd.DataFrame, keys: list[str], **columns: pd.Series
) -> str:
    """Per-seed differences as Markdown, with each seed's McNemar p under ``(*keys, seed)``."""
    rows = list(differences.itertuples())
    shown = differences.assign(
        differences=differences["differences"].map(_by_seed),
        ahead=[f"{row.ahead}/{row.n}" for row in rows],
        **columns,
        mcnemar_p=[
            _p_by_seed(p_values, tuple(getattr(row, key) for key in keys), row.differences)
            for row in rows
        ],
    )
    return markdown_table(pd.DataFrame(shown))


def _by_seed(values: dict[int, float]) -> str:
    return ", ".join(f"{seed}: {value:+.4f}" for seed, value in values.items())


def _p_by_seed(p_values: pd.DataFrame, key: tuple, seeds: dict[int, float]) -> str:
    """``seed: p`` for the seeds of ``seeds`` that have a p under ``(*key, seed)``."""
    return ", ".join(
        f"{seed}: {p_values.at[(*key, seed), 'p']:.3g}"
        for seed in seeds
        if (*key, seed) in p_values.index
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m weighted_lowrank.analysis.sweep", description=__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the default pipeline for every seed, budget and allocation"
    )
    run.add_argument("--seeds", type=int, nargs="+", required=True)
    run.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    run.add_argument(
        "--allocations",
        nargs="+",
        choices=ALLOCATIONS,
        default=["uniform"],
        help="compression.allocation of each run (every budget runs every allocation)",
    )
    run.add_argument("--env", default=None, help="Kedro environment, e.g. smoke")
    run.add_argument(
        "--pipeline", default="__default__", help="__default__, or refined (with refinement)"
    )
    run.add_argument("--tracking-uri", default=None, help="MLflow store (default: mlflow.db)")
    run.add_argument(
        "--params",
        nargs="+",
        default=[],
        help="parameter overrides, one 'dotted.key=value' per argument (values may hold commas), "
        "e.g. 'data.catalog.label_values=[rotten,fresh,plot]'",
    )
    report = commands.add_parser(
        "report", help="mean ± sd over seeds, paired differences, global − uniform"
    )
    report.add_argument("--tracking-uri", default=None, help="MLflow store (default: mlflow.db)")
    report.add_argument("--reference", default="fwsvd")
    arguments = parser.parse_args(argv)
    project = _project_root()
    tracking_uri = arguments.tracking_uri or f"sqlite:///{project / 'mlflow.db'}"
    if arguments.command == "run":
        run_sweep(
            arguments.seeds,
            arguments.budgets,
            allocations=arguments.allocations,
            project_path=project,
            env=arguments.env,
            pipeline=arguments.pipeline,
            runtime_params={
                **parse_overrides(arguments.params),
                "mlflow_tracking_uri": tracking_uri,
            },
        )
    else:
        print(sweep_report(tracking_uri, arguments.reference), end="")


def _project_root() -> Path:
    from kedro.utils import find_kedro_project

    found = find_kedro_project(Path.cwd())
    if found is None:
        raise SystemExit("run this from inside the weighted-lowrank project (no pyproject.toml)")
    return Path(found)


if __name__ == "__main__":
    main()
