"""Seed sweeps: the default run for several seeds and budgets, and the comparison across seeds.

``python -m weighted_lowrank.sweep run --seeds 0 1 2 --budgets 0.5 0.3 0.7`` runs, for every
seed, the whole default pipeline at the first budget (fine-tuning and the Fisher sample follow
the seed) and then the factorization, evaluation and reporting at the other budgets on that
seed's fine-tuned model and Fisher (``--from-nodes svd_reference``). Every run is one
``KedroSession`` and so one MLflow parent run, its child runs carrying ``seed`` and ``budget``.
The data split stays the configured one for every seed, so every model of every seed is scored on
the same test sentences.

``python -m weighted_lowrank.sweep report`` reads the MLflow store and prints, as Markdown, the
task metric's mean ± sd over seeds per solver and budget, and the per-seed paired differences
against ``fwsvd``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from weighted_lowrank.pipelines.reporting.nodes import markdown_table
from weighted_lowrank.pipelines.reporting.run_history import (
    child_runs,
    latest_per_seed,
    paired_p_values,
    seed_differences,
    seed_summary,
    task_metric,
)


def run_sweep(
    seeds: Sequence[int],
    budgets: Sequence[float],
    *,
    project_path: Path,
    env: str | None = None,
    pipeline: str = "__default__",
    runtime_params: dict[str, Any] | None = None,
) -> None:
    """One Kedro session per (seed, budget); the first budget of a seed runs the whole pipeline."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project_path)
    extra = dict(runtime_params or {})
    with KedroSession.create(project_path=project_path, env=env, runtime_params=extra) as session:
        split_seed = session.load_context().params["data"]["split"]["seed"]
    for seed in seeds:
        for index, budget in enumerate(budgets):
            overrides = _deep_merge(
                extra,
                {
                    "seed": seed,
                    "compression": {"budget": budget},
                    "data": {"split": {"seed": split_seed}},
                },
            )
            with KedroSession.create(
                project_path=project_path, env=env, runtime_params=overrides
            ) as session:
                session.run(
                    pipeline_names=[pipeline],
                    from_nodes=None if index == 0 else ["svd_reference"],
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
    """``["data.catalog.label_values=[rotten,fresh,plot]", ...]`` → a nested dict, values parsed
    as YAML by OmegaConf (as ``kedro run --params`` does, but one item per argument, so a value
    may hold commas)."""
    from omegaconf import OmegaConf

    malformed = [item for item in items if "=" not in item or not item.partition("=")[0].strip()]
    if malformed:
        raise ValueError(f"--params items {malformed} are not 'dotted.key=value'")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)))


def end_active_runs() -> None:
    """Close every MLflow run this process still holds open.

    kedro-mlflow 2.0.3 re-enters the parent run before every node and closes it once after the
    pipeline, so the run stays open in the process; the next session would log into it (and fail
    on a changed param) instead of starting its own parent run.
    """
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def sweep_report(tracking_uri: str, reference: str = "fwsvd") -> str:
    """Markdown: mean ± sd over seeds per solver × budget, and paired differences vs ``reference``."""
    runs = latest_per_seed(child_runs(tracking_uri))
    metric = task_metric(runs)
    summary = seed_summary(runs, metric)
    cells = summary.assign(
        value=[
            f"{row.mean:.4f} ± {row.sd:.4f} (n={row.n})" if row.n > 1 else f"{row.mean:.4f} (n=1)"
            for row in summary.itertuples()
        ]
    )
    wide = cells.pivot(index="solver", columns="budget", values="value")
    wide = wide.reindex(["dense", *sorted(set(wide.index) - {"dense"})]).dropna(how="all")
    wide.columns = [f"budget {budget:g}" for budget in wide.columns]
    differences = seed_differences(runs, reference, metric)
    lines = [
        f"## Test {metric} over seeds (mean ± sd)",
        "",
        markdown_table(wide.fillna("").reset_index()),
        "",
        f"## Paired by seed: {metric} − {reference}'s at the same seed and budget",
        "",
    ]
    if differences.empty:
        lines.append(f"(no {reference!r} rows to pair with)")
    else:
        p_values = paired_p_values(tracking_uri, reference).set_index(["solver", "budget", "seed"])
        shown = differences.assign(
            differences=differences["differences"].map(
                lambda values: ", ".join(f"{seed}: {value:+.4f}" for seed, value in values.items())
            ),
            ahead=[f"{row.ahead}/{row.n}" for row in differences.itertuples()],
            mcnemar_p=[
                ", ".join(
                    f"{seed}: {p_values.at[(row.solver, row.budget, seed), 'p']:.3g}"
                    for seed in row.differences
                    if (row.solver, row.budget, seed) in p_values.index
                )
                for row in differences.itertuples()
            ],
        )
        lines.append(markdown_table(pd.DataFrame(shown)))
        lines += [
            "",
            f"`mcnemar_p`: per seed, the exact McNemar test of the row against {reference} on the "
            "shared test sentences (the run's paired tests).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weighted_lowrank.sweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the default pipeline for every seed and budget")
    run.add_argument("--seeds", type=int, nargs="+", required=True)
    run.add_argument("--budgets", type=float, nargs="+", default=[0.5])
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
    report = commands.add_parser("report", help="mean ± sd over seeds and paired differences")
    report.add_argument("--tracking-uri", default=None, help="MLflow store (default: mlflow.db)")
    report.add_argument("--reference", default="fwsvd")
    arguments = parser.parse_args(argv)
    project = _project_root()
    tracking_uri = arguments.tracking_uri or f"sqlite:///{project / 'mlflow.db'}"
    if arguments.command == "run":
        run_sweep(
            arguments.seeds,
            arguments.budgets,
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
