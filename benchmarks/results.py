"""Write the measured tables of docs/RESULTS.md from the project's MLflow store.

Run ``python benchmarks/results.py`` after the budget sweep (``benchmarks/results.sh``). It takes
the newest child runs of every (solver, budget) that has a refined row ``refined.<solver>`` —
``kedro run --pipelines refined`` — and, when present, the risk validation written by
``kedro run --pipelines risk_validation``, and rewrites the ``results`` section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]

from doc_sections import write_section  # noqa: E402  (benchmarks/ is the script directory)

from weighted_lowrank.analysis.run_history import (  # noqa: E402
    child_runs,
    is_refined,
    latest_per_budget,
    markdown_table,  # noqa: E402
    quality_vs_params_figure,
    task_metric,
    with_refined_columns,
)

RESULTS_PATH = REPO_ROOT / "docs" / "RESULTS.md"
FIGURE_PATH = REPO_ROOT / "docs" / "results_quality_vs_params.png"
RISK_SUMMARY = REPO_ROOT / "data" / "08_reporting" / "risk_validation_summary.json"
#: Element-wise (TFWSVD-objective) solvers, as opposed to svd and the one-sided fwsvd.
ELEMENT_WISE = ("tfwsvd", "als", "em", "adam", "sgd", "adam_sgd")


def _cell(value: float, digits: int = 3) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def results_table(latest: pd.DataFrame, metric: str) -> str:
    """Solvers × budgets: metric without / with refinement, weighted loss vs SVD, params kept.

    ``latest`` has one row per solver and budget with ``<metric>_refined``
    (:func:`with_refined_columns`).
    """
    budgets = sorted(latest.loc[latest["solver"] != "dense", "budget"].unique())
    header = ["solver"]
    for budget in budgets:
        header += [f"{budget:g}: {metric}", f"{budget:g}: refined", f"{budget:g}: loss/SVD"]
    dense = latest[latest["solver"] == "dense"].iloc[-1]
    table = [["dense", *[cell for _ in budgets for cell in (_cell(dense[metric]), "–", "–")]]]
    for solver in sorted(set(latest["solver"]) - {"dense"}):
        cells = [solver]
        for budget in budgets:
            found = latest[(latest["solver"] == solver) & (latest["budget"] == budget)]
            if found.empty:
                cells += ["–", "–", "–"]
                continue
            row = found.iloc[-1]
            cells += [
                _cell(row[metric]),
                _cell(row.get(f"{metric}_refined")),
                _cell(row["weighted_loss_rel_svd"]),
            ]
        table.append(cells)
    kept = []
    for budget in budgets:
        rows = latest[(latest["budget"] == budget) & (latest["solver"] != "dense")]
        kept.append(
            f"{rows['params_ratio_model'].iloc[0]:.3f} of the model, "
            f"{rows['params_ratio_layers'].iloc[0]:.3f} of the targeted layers"
        )
    footer = "Parameters kept: " + "; ".join(
        f"budget {budget:g}: {text}" for budget, text in zip(budgets, kept, strict=True)
    )
    return markdown_table(pd.DataFrame(table, columns=header)) + "\n\n" + footer + "."


def claim_evidence(latest: pd.DataFrame, metric: str) -> str:
    """Per budget: the differences each research claim is about (``latest`` as for
    :func:`results_table`)."""
    dense = float(latest.loc[latest["solver"] == "dense", metric].iloc[-1])
    header = [
        "budget",
        "best element-wise",
        "best elem. − fwsvd",
        "fwsvd − svd",
        "dense − best (no refinement)",
        "mean gain of refinement",
        "dense − best refined",
    ]
    lines = []
    refined_metric = f"{metric}_refined"
    for budget, rows in latest[latest["solver"] != "dense"].groupby("budget"):
        rows = rows.set_index("solver")
        elementwise = rows.loc[rows.index.intersection(ELEMENT_WISE), metric]
        best = elementwise.idxmax()
        gain = (rows[refined_metric] - rows[metric]).mean() if refined_metric in rows else math.nan
        best_refined = rows[refined_metric].max() if refined_metric in rows else math.nan
        lines.append(
            [
                f"{budget:g}",
                f"{best} {elementwise[best]:.3f}",
                f"{elementwise[best] - rows.loc['fwsvd', metric]:+.3f}",
                f"{rows.loc['fwsvd', metric] - rows.loc['svd', metric]:+.3f}",
                f"{dense - rows[metric].max():+.3f}",
                f"{gain:+.3f}",
                f"{dense - best_refined:+.3f}",
            ]
        )
    return markdown_table(pd.DataFrame(lines, columns=header))


def risk_section(path: Path) -> str:
    """Spearman correlations of the risk validation (statistic × outcome), or how to get them."""
    if not path.is_file():
        return f"(no {path.relative_to(REPO_ROOT)}: run `kedro run --pipelines risk_validation`)"
    summary = json.loads(path.read_text())
    correlations = summary["correlations"]  # {outcome: {statistic: {rho, p_value, n}}}
    outcomes = list(correlations)
    header = ["statistic", *(f"ρ vs {outcome} (p)" for outcome in outcomes)]
    rows = []
    for statistic in summary["statistics"]:
        cells = [statistic]
        for outcome in outcomes:
            value = correlations[outcome].get(statistic, {})
            cells.append(f"{_cell(value.get('rho'), 2)} ({_cell(value.get('p_value'), 2)})")
        rows.append(cells)
    best = ", ".join(f"{outcome}: {name}" for outcome, name in summary["best_predictor"].items())
    n = next(iter(correlations[outcomes[0]].values()))["n"]
    return (
        markdown_table(pd.DataFrame(rows, columns=header))
        + f"\n\nn = {n} layers, {summary['examples']} validation examples, weighted solver "
        f"{summary['weighted_solver']}; best predictor (largest ρ): {best}. Summed loss increase "
        f"over the layers: SVD {summary['svd_loss_increase_sum']:+.3f}, "
        f"{summary['weighted_solver']} {summary['tfwsvd_loss_increase_sum']:+.3f} nats; the "
        f"weighted solver beats SVD on {summary['weighted_gain_positive_layers']} of {n} layers."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tracking-uri",
        default=f"sqlite:///{REPO_ROOT / 'mlflow.db'}",
        help="MLflow store of the sweep (default: the project's mlflow.db)",
    )
    parser.add_argument("--output", default=str(RESULTS_PATH))
    parser.add_argument("--risk-summary", default=str(RISK_SUMMARY))
    parser.add_argument("--figure", default=str(FIGURE_PATH), help="quality-vs-parameters plot")
    args = parser.parse_args(argv)

    latest = latest_per_budget(child_runs(args.tracking_uri), refined_only=True)
    metric = task_metric(latest)
    started = latest["started"].min().strftime("%Y-%m-%d %H:%M")
    refinement = latest.loc[latest["solver"].map(is_refined), "refinement"].iloc[-1]
    wide = with_refined_columns(latest)
    figure = Path(args.figure)
    quality_vs_params_figure(latest, metric).savefig(figure, dpi=90)
    relative = os.path.relpath(figure, Path(args.output).parent)
    text = "\n\n".join(
        [
            f"Written {dt.date.today()} on {platform.node()} from the newest refined child runs "
            f"(earliest started {started} UTC), test split of the embedded default. Refined = "
            f"the compressed model fine-tuned after compression ({refinement}). "
            "loss/SVD = Σ Fisher-weighted loss over the targeted layers relative to SVD's.",
            results_table(wide, metric),
            f"![test {metric} vs parameters kept, one line per solver, dotted: refined]"
            f"({relative})",
            "Differences behind each claim (test " + metric + "):",
            claim_evidence(wide, metric),
            "Risk validation (Spearman over the targeted layers, one layer compressed at a time):",
            risk_section(Path(args.risk_summary)),
        ]
    )
    print(text)
    write_section(Path(args.output), "results", text, "benchmarks/results.py")
    print(f"wrote the results section of {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
