"""Nodes of ``risk_validation`` that read ``risk_validation_table``: which risk statistic predicts
the reference solver's damage? Each reads "larger = riskier": a negative ρ predicts nothing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import RiskValidationParams
from weighted_lowrank.lowrank.risk import RISK_STATISTICS
from weighted_lowrank.lowrank.targets import ordered_kinds

from .nodes import LAYER_COLUMNS

#: Columns of ``layer_risk`` that are not statistics.
DESCRIPTIVE = (*LAYER_COLUMNS, "out_features", "in_features", "risk", "model_fingerprint")


def spearman(x: pd.Series, y: pd.Series) -> dict[str, float | int | None]:
    """Spearman ρ, its two-sided p-value and n over the rows where both are finite (ρ and p
    ``None`` for fewer than three rows or a constant column)."""
    both = pd.DataFrame({"x": x, "y": y}).astype(float).replace([np.inf, -np.inf], np.nan).dropna()
    n = len(both)
    if n < 3 or both["x"].nunique() < 2 or both["y"].nunique() < 2:
        return {"rho": None, "p_value": None, "n": n}
    result = stats.spearmanr(both["x"], both["y"])
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": n}


def largest_rho(correlations: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The name whose :func:`spearman` ρ is the largest (None when no ρ is defined)."""
    ranked = [
        (value["rho"], name) for name, value in correlations.items() if value["rho"] is not None
    ]
    return max(ranked)[1] if ranked else None


def finite(value: Any) -> float | None:
    """``value`` as a float, or None (JSON null) for None, NaN and ±inf."""
    value = None if value is None else float(value)
    return value if value is not None and math.isfinite(value) else None


def outcomes(reference: str) -> dict[str, str]:
    """The outcomes the statistics are correlated with: ``{column: short name}``."""
    return {
        f"{reference}_kl": "kl",
        f"{reference}_loss_increase": "damage",
        "weighted_gain": "gain",
        f"{reference}_curvature_damage": "curvature",
    }


def _statistics(table: pd.DataFrame, requested: list[str] | None, reference: str) -> list[str]:
    """The statistics to correlate: the requested ones, or every risk statistic in the table."""
    if requested is None:
        return [name for name in RISK_STATISTICS if name in table.columns]
    # layer_risk's columns come first, the measured ones from <reference>_loss on.
    columns = table.columns[: table.columns.get_loc(f"{reference}_loss")]
    available = [column for column in columns if column not in DESCRIPTIVE]
    wrong = [name for name in requested if name not in available]
    if wrong:
        raise ValueError(
            f"risk_validation.statistics {wrong} are not statistic columns of layer_risk; it has "
            f"{available}"
        )
    return list(requested)


def summarize_risk_validation(
    risk_validation_table: pd.DataFrame,
    risk_validation: RiskValidationParams,
    *,
    reference: str,
    weighted: str,
) -> dict[str, Any]:
    """:func:`spearman` of each statistic with each outcome, and the totals."""
    table = risk_validation_table
    statistics = _statistics(table, risk_validation.statistics, reference)
    correlations = {
        outcome: {name: spearman(table[name], table[outcome]) for name in statistics}
        for outcome in outcomes(reference)
        if outcome in table.columns
    }
    best = {outcome: largest_rho(by_statistic) for outcome, by_statistic in correlations.items()}
    damage = table[f"{reference}_loss_increase"]
    summary: dict[str, Any] = {
        "weighted_solver": weighted,
        "layers": len(table),
        "examples": int(table["examples"].iloc[0]),
        "dense_loss": float(table["dense_loss"].iloc[0]),
        "dense_accuracy": finite(table["dense_accuracy"].iloc[0]),
        "statistics": statistics,
        "correlations": correlations,
        "best_predictor": best,
        f"{reference}_loss_increase_sum": float(damage.sum()),
        f"{reference}_loss_increase_max": float(damage.max()),
        f"{reference}_loss_increase_max_module": str(table.loc[damage.idxmax(), "module"]),
        f"{weighted}_loss_increase_sum": float(table[f"{weighted}_loss_increase"].sum()),
        "weighted_gain_sum": float(table["weighted_gain"].sum()),
        "weighted_gain_positive_layers": int((table["weighted_gain"] > 0).sum()),
        "seconds": float(table["seconds"].sum()),
    }
    sums = [f"{reference}_kl", f"{weighted}_kl", f"{reference}_curvature_damage"]
    summary.update({f"{name}_sum": float(table[name].sum()) for name in sums if name in table})
    if f"{reference}_first_order" in table:
        summary[f"{reference}_first_order_abs_sum"] = float(
            table[f"{reference}_first_order"].abs().sum()
        )
    if "svd_taylor_loss" in table:
        for key, column in (("measured", "loss_increase"), ("curvature", "curvature_damage")):
            total = table[f"{reference}_{column}"].sum() if f"{reference}_{column}" in table else 0
            if total != 0:
                taylor = table["svd_taylor_loss"].sum()
                summary[f"svd_taylor_loss_sum_rel_{key}"] = float(taylor / total)
    return with_fingerprint(summary, fingerprint_of(table))


def risk_validation_metrics(
    risk_validation_summary: dict[str, Any], *, reference: str
) -> dict[str, dict]:
    """The summary as MLflow metrics (step 0): ρ and p per outcome and statistic, and its totals."""
    short = outcomes(reference)
    metrics = {}
    for outcome, by_statistic in risk_validation_summary["correlations"].items():
        for name, value in by_statistic.items():
            if value["rho"] is not None:
                metrics[f"spearman_{short[outcome]}.{name}"] = value["rho"]
                metrics[f"p_value_{short[outcome]}.{name}"] = value["p_value"]
    for key, value in risk_validation_summary.items():
        if isinstance(value, int | float) and not key.endswith(("_max", "_positive_layers")):
            metrics[key] = float(value)
    return {key: {"value": float(value), "step": 0} for key, value in metrics.items()}


def plot_risk_validation(
    risk_validation_table: pd.DataFrame,
    risk_validation_summary: dict[str, Any],
    *,
    reference: str,
    weighted: str,
) -> Figure:
    """φ, and each outcome's best predictor when that is not φ, against each outcome."""
    table = risk_validation_table
    correlations = risk_validation_summary["correlations"]
    best = risk_validation_summary["best_predictor"]
    panels = [("phi", outcome) for outcome in correlations if "phi" in correlations[outcome]]
    panels += [
        (best[outcome], outcome) for outcome in correlations if best[outcome] not in (None, "phi")
    ]
    if not panels:
        raise ValueError("the summary has no correlation to plot (no statistic in layer_risk)")
    name = reference.upper()
    labels = {
        f"{reference}_kl": f"{name} KL(p_dense ‖ p_compressed), nats",
        f"{reference}_curvature_damage": f"{name} curvature damage (even part)",
        f"{reference}_loss_increase": f"{name} damage (val. loss increase)",
        "weighted_gain": f"weighted gain ({name} − {weighted} loss increase)",
    }
    rows = math.ceil(len(panels) / 2)
    figure = Figure(figsize=(11, 4.2 * rows))
    grid = figure.subplots(rows, 2, squeeze=False)
    for axes, (statistic, outcome) in zip(grid.flat, panels, strict=False):
        _scatter_by_kind(axes, table, statistic, outcome)
        value = correlations[outcome][statistic]
        rho = "n/a" if value["rho"] is None else f"{value['rho']:.2f} (p = {value['p_value']:.2g})"
        prefix = "best predictor: " if statistic == best[outcome] else ""
        axes.set_title(
            f"{prefix}{statistic} vs {outcomes(reference)[outcome]}: Spearman ρ = {rho}, "
            f"n = {value['n']}",
            fontsize=9,
        )
        axes.set_xlabel(statistic + (" (log)" if axes.get_xscale() == "log" else ""))
        axes.set_ylabel(labels[outcome])
    for axes in list(grid.flat)[len(panels) :]:
        axes.set_visible(False)
    grid.flat[0].legend(fontsize=8, title="module kind", title_fontsize=8)
    figure.suptitle(
        f"Does the risk statistic predict {name} damage? {len(table)} layers, each compressed "
        f"alone, {int(table['examples'].iloc[0])} validation examples"
    )
    figure.tight_layout()
    return figure


def _scatter_by_kind(axes: Any, table: pd.DataFrame, x: str, y: str) -> None:
    """Column ``y`` against ``x`` by module kind; x log where positive, y symmetric-log."""
    for index, kind in enumerate(ordered_kinds(table["kind"])):
        of_kind = table[table["kind"] == kind]
        axes.scatter(of_kind[x], of_kind[y], label=kind, color=f"C{index % 10}", s=28, alpha=0.85)
    values = table[x].to_numpy(dtype=float)
    if np.all(values[np.isfinite(values)] > 0):
        axes.set_xscale("log")
    values = np.abs(table[y].to_numpy(dtype=float))
    nonzero = values[np.isfinite(values) & (values > 0)]
    if nonzero.size:
        axes.set_yscale("symlog", linthresh=float(np.median(nonzero)))
    axes.axhline(0.0, color="grey", linewidth=0.8)
