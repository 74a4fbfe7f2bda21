"""Nodes of ``risk_validation``: does a cheap risk statistic predict where plain SVD hurts?

Every targeted layer is compressed alone — its ``LowRankLinear`` from the ``svd`` compressed model,
then from the weighted solver's, swapped into a copy of the dense model — and the validation loss
and accuracy are measured. A layer's *damage* is the validation-loss increase over the dense
model; the *weighted gain* is SVD's damage minus the weighted solver's. Spearman correlations
between each statistic of ``layer_risk`` and the two say which statistic predicts them.

With ``curvature`` the layer is also evaluated with the mirrored weight W + R = 2W − W_svd (R the
SVD residual). Writing L(W − R) = L(W) − g·R + ½ RᵀHR + O(R³), the odd (first-order) part
``svd_first_order`` = (L(W − R) − L(W + R)) / 2 and the even part ``svd_curvature_damage`` =
(L(W − R) + L(W + R)) / 2 − L(W) ≈ ½ RᵀHR separate; a Fisher statistic can only predict the
even part, since the Fisher knows nothing of the validation gradient's sign.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy import stats

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.layer import lowrank_ranks
from weighted_lowrank.lowrank.risk import RISK_STATISTICS
from weighted_lowrank.lowrank.risk import spearman as spearman_rho
from weighted_lowrank.lowrank.targets import ordered_kinds
from weighted_lowrank.parameters import ModelParams, RiskValidationParams
from weighted_lowrank.training import evaluate_classifier

logger = logging.getLogger(__name__)

#: The element-wise weighted solver whose compressed model is compared with ``svd``'s.
WEIGHTED_SOLVER = "tfwsvd"
#: What the statistics are correlated with (when in the table): short name for MLflow metrics.
OUTCOMES = {
    "svd_loss_increase": "damage",
    "weighted_gain": "gain",
    "svd_curvature_damage": "curvature",
}
#: Columns of ``layer_risk`` that are not statistics.
_DESCRIPTIVE = (
    "module",
    "layer",
    "kind",
    "rank",
    "out_features",
    "in_features",
    "risk",
    "model_fingerprint",
)
#: Columns :func:`measure_layer_damage` adds (measurements, not statistics).
_MEASURED = (
    *(
        f"{solver}_{name}"
        for solver in ("svd", WEIGHTED_SOLVER)
        for name in ("loss", "accuracy", "loss_increase", "accuracy_drop")
    ),
    "weighted_gain",
    "svd_mirror_loss",
    "svd_first_order",
    "svd_curvature_damage",
    "seconds",
    "dense_loss",
    "dense_accuracy",
    "examples",
)


def check_layers(
    svd_model: ModelBundle, weighted_model: ModelBundle, layer_risk: pd.DataFrame
) -> dict[str, int]:
    """``{module: rank}`` in ``layer_risk`` order, once the three agree on modules and ranks.

    Lineage (``hooks.LineageCheck``) says the inputs come from one fine-tuned model; it cannot
    tell that they were compressed at one budget and targets, which this checks.
    """
    svd = lowrank_ranks(svd_model.model)
    weighted = lowrank_ranks(weighted_model.model)
    if not svd:
        raise ValueError("svd.compressed_model has no LowRankLinear modules")
    if svd != weighted:
        only_svd = sorted(set(svd) - set(weighted))
        only_weighted = sorted(set(weighted) - set(svd))
        ranks = {
            name: (svd[name], weighted[name])
            for name in svd
            if name in weighted and svd[name] != weighted[name]
        }
        raise ValueError(
            f"svd.compressed_model and {WEIGHTED_SOLVER}.compressed_model differ: modules only in "
            f"svd {only_svd[:5]}, only in {WEIGHTED_SOLVER} {only_weighted[:5]}, ranks (svd, "
            f"{WEIGHTED_SOLVER}) {dict(list(ranks.items())[:5])}; load both from one run"
        )
    for column in ("module", "kind", "layer"):
        if column not in layer_risk.columns:
            raise ValueError(f"layer_risk lacks the column {column!r}; it has {list(layer_risk)}")
    modules = layer_risk["module"].tolist()
    if len(set(modules)) != len(modules) or set(modules) != set(svd):
        raise ValueError(
            f"layer_risk's modules differ from the compressed models': only in layer_risk "
            f"{sorted(set(modules) - set(svd))[:5]}, only in the models "
            f"{sorted(set(svd) - set(modules))[:5]}"
            + (", duplicated rows" if len(set(modules)) != len(modules) else "")
            + "; rerun svd_risk on the same model and budget"
        )
    if "rank" in layer_risk.columns:
        wrong = {
            module: (int(rank), svd[module])
            for module, rank in zip(layer_risk["module"], layer_risk["rank"], strict=True)
            if int(rank) != svd[module]
        }
        if wrong:
            raise ValueError(
                f"layer_risk's ranks differ from the compressed models' (layer_risk, models): "
                f"{dict(list(wrong.items())[:5])}; were they built at the same budget?"
            )
    return {module: svd[module] for module in modules}


def measure_layer_damage(
    fine_tuned_model: ModelBundle,
    svd_compressed_model: ModelBundle,
    weighted_compressed_model: ModelBundle,
    validation_split: pd.DataFrame,
    layer_risk: pd.DataFrame,
    model: ModelParams,
    risk_validation: RiskValidationParams,
    device: str,
) -> pd.DataFrame:
    """Validation loss and accuracy with each targeted layer compressed alone, per solver.

    One row per ``layer_risk`` row: its columns, then ``svd_loss``, ``tfwsvd_loss``,
    ``svd_accuracy``, ``tfwsvd_accuracy``, ``svd_loss_increase`` / ``tfwsvd_loss_increase``
    (over the dense model), ``svd_accuracy_drop`` / ``tfwsvd_accuracy_drop``, ``weighted_gain``
    (SVD's loss increase minus tfwsvd's), with ``risk_validation.curvature`` also
    ``svd_mirror_loss`` (weight 2W − W_svd), ``svd_first_order`` and ``svd_curvature_damage``
    (module docstring), then ``seconds`` (the layer's evaluations) and the constants
    ``dense_loss``, ``dense_accuracy``, ``examples``. Accuracies are NaN for a regression model.
    ``risk_validation.max_examples`` keeps the first rows of the split (it is shuffled).
    """
    ranks = check_layers(svd_compressed_model, weighted_compressed_model, layer_risk)
    frame = validation_split
    if risk_validation.max_examples is not None:
        frame = frame.head(risk_validation.max_examples)
    run_device = resolve_device(device)
    working = copy.deepcopy(fine_tuned_model.model).to(run_device).eval()
    sources = {"svd": svd_compressed_model.model, WEIGHTED_SOLVER: weighted_compressed_model.model}

    def evaluate() -> tuple[float, float]:
        scores = evaluate_classifier(
            working,
            fine_tuned_model.tokenizer,
            frame,
            model.max_length,
            batch_size=risk_validation.batch_size,
            device=run_device,
        )
        return scores["loss"], scores.get("accuracy", math.nan)

    dense_loss, dense_accuracy = evaluate()
    measured = []
    for index, name in enumerate(ranks):
        started = time.perf_counter()
        row = _measure_layer(
            working, name, sources, evaluate, risk_validation.curvature, run_device
        )
        row["seconds"] = time.perf_counter() - started
        measured.append(row)
        logger.info(
            "risk_validation %d/%d %s: loss increase svd %.4g, %s %.4g (%.1f s)",
            index + 1,
            len(ranks),
            name,
            row["svd_loss"] - dense_loss,
            WEIGHTED_SOLVER,
            row[f"{WEIGHTED_SOLVER}_loss"] - dense_loss,
            row["seconds"],
        )
    table = _damage_table(layer_risk, pd.DataFrame(measured), dense_loss, dense_accuracy)
    table["examples"] = len(frame)
    return with_fingerprint(table, model_fingerprint(fine_tuned_model.model))


def _measure_layer(
    working: torch.nn.Module,
    name: str,
    sources: dict[str, torch.nn.Module],
    evaluate: Callable[[], tuple[float, float]],
    curvature: bool,
    device: torch.device,
) -> dict[str, float]:
    """Loss and accuracy of ``working`` with its layer ``name`` taken from each source in turn
    (and, with ``curvature``, with the mirrored weight 2W − W_svd); ``working`` is restored."""
    row: dict[str, float] = {}
    original = working.get_submodule(name)
    for solver, source in sources.items():
        working.set_submodule(name, copy.deepcopy(source.get_submodule(name)).to(device))
        try:
            row[f"{solver}_loss"], row[f"{solver}_accuracy"] = evaluate()
        finally:
            working.set_submodule(name, original)
    if curvature:
        mirrored = copy.deepcopy(original)
        approximation = sources["svd"].get_submodule(name).dense_weight().detach()
        with torch.no_grad():
            mirrored.weight.copy_(2 * original.weight - approximation.to(original.weight))
        working.set_submodule(name, mirrored)
        try:
            row["svd_mirror_loss"], _ = evaluate()
        finally:
            working.set_submodule(name, original)
    return row


def _damage_table(
    layer_risk: pd.DataFrame, results: pd.DataFrame, dense_loss: float, dense_accuracy: float
) -> pd.DataFrame:
    """``layer_risk`` (descriptive columns first) with the measured columns appended."""
    table = layer_risk.reset_index(drop=True).copy()
    first = [column for column in ("module", "layer", "kind", "rank") if column in table.columns]
    table = table[first + [column for column in table.columns if column not in first]]
    solvers = ("svd", WEIGHTED_SOLVER)
    for solver in solvers:
        table[f"{solver}_loss"] = results[f"{solver}_loss"]
        table[f"{solver}_accuracy"] = results[f"{solver}_accuracy"]
    for solver in solvers:
        table[f"{solver}_loss_increase"] = results[f"{solver}_loss"] - dense_loss
    for solver in solvers:
        table[f"{solver}_accuracy_drop"] = dense_accuracy - results[f"{solver}_accuracy"]
    table["weighted_gain"] = table["svd_loss_increase"] - table[f"{WEIGHTED_SOLVER}_loss_increase"]
    if "svd_mirror_loss" in results.columns:
        table["svd_mirror_loss"] = results["svd_mirror_loss"]
        table["svd_first_order"] = (results["svd_loss"] - results["svd_mirror_loss"]) / 2
        table["svd_curvature_damage"] = (
            results["svd_loss"] + results["svd_mirror_loss"]
        ) / 2 - dense_loss
    table["seconds"] = results["seconds"]
    table["dense_loss"] = dense_loss
    table["dense_accuracy"] = dense_accuracy
    return table


def _statistics(table: pd.DataFrame, requested: list[str] | None) -> list[str]:
    """The statistics to correlate: the requested ones, or every risk statistic in the table."""
    if requested is None:
        return [name for name in RISK_STATISTICS if name in table.columns]
    available = [c for c in table.columns if c not in _DESCRIPTIVE and c not in _MEASURED]
    wrong = [name for name in requested if name not in available]
    if wrong:
        raise ValueError(
            f"risk_validation.statistics {wrong} are not statistic columns of layer_risk; it has "
            f"{available}"
        )
    return list(requested)


def spearman(x: pd.Series, y: pd.Series) -> dict[str, float | int | None]:
    """Spearman ρ, its two-sided p-value and n over the rows where both are finite.

    ρ and p are ``None`` (JSON null) for fewer than three rows or a constant column.
    """
    both = pd.DataFrame({"x": x, "y": y}).astype(float).replace([np.inf, -np.inf], np.nan).dropna()
    n = len(both)
    if n < 3 or both["x"].nunique() < 2 or both["y"].nunique() < 2:
        return {"rho": None, "p_value": None, "n": n}
    result = stats.spearmanr(both["x"], both["y"])
    return {"rho": spearman_rho(both["x"], both["y"]), "p_value": float(result.pvalue), "n": n}


def summarize_risk_validation(
    risk_validation_table: pd.DataFrame, risk_validation: RiskValidationParams
) -> dict[str, Any]:
    """Spearman correlations of every statistic with SVD's damage and with the weighted gain.

    ``correlations[outcome][statistic]`` is ``{"rho", "p_value", "n"}`` for the outcomes
    ``svd_loss_increase``, ``weighted_gain`` and, when measured, ``svd_curvature_damage``;
    ``best_predictor[outcome]`` is the statistic with the largest ρ (every statistic is read as
    "larger = riskier", so a negative ρ predicts nothing useful). Also: the dense model's loss and
    accuracy, layer and example counts, damage and gain totals; with ``svd_taylor_loss``, its
    total over the measured damage's (and over the curvature damage's).
    """
    table = risk_validation_table
    statistics = _statistics(table, risk_validation.statistics)
    outcomes = [outcome for outcome in OUTCOMES if outcome in table.columns]
    correlations = {
        outcome: {name: spearman(table[name], table[outcome]) for name in statistics}
        for outcome in outcomes
    }
    best = {}
    for outcome, by_statistic in correlations.items():
        ranked = [
            (value["rho"], name) for name, value in by_statistic.items() if value["rho"] is not None
        ]
        best[outcome] = max(ranked)[1] if ranked else None
    damage = table["svd_loss_increase"]
    summary: dict[str, Any] = {
        "weighted_solver": WEIGHTED_SOLVER,
        "layers": len(table),
        "examples": int(table["examples"].iloc[0]),
        "dense_loss": float(table["dense_loss"].iloc[0]),
        "dense_accuracy": _finite(table["dense_accuracy"].iloc[0]),
        "statistics": statistics,
        "correlations": correlations,
        "best_predictor": best,
        "svd_loss_increase_sum": float(damage.sum()),
        "svd_loss_increase_max": float(damage.max()),
        "svd_loss_increase_max_module": str(table.loc[damage.idxmax(), "module"]),
        f"{WEIGHTED_SOLVER}_loss_increase_sum": float(
            table[f"{WEIGHTED_SOLVER}_loss_increase"].sum()
        ),
        "weighted_gain_sum": float(table["weighted_gain"].sum()),
        "weighted_gain_positive_layers": int((table["weighted_gain"] > 0).sum()),
        "seconds": float(table["seconds"].sum()),
    }
    if "svd_curvature_damage" in table.columns:
        summary["svd_curvature_damage_sum"] = float(table["svd_curvature_damage"].sum())
        summary["svd_first_order_abs_sum"] = float(table["svd_first_order"].abs().sum())
    if "svd_taylor_loss" in table.columns:
        for key, column in (
            ("svd_taylor_loss_sum_rel_measured", "svd_loss_increase"),
            ("svd_taylor_loss_sum_rel_curvature", "svd_curvature_damage"),
        ):
            if column in table.columns and table[column].sum() != 0:
                summary[key] = float(table["svd_taylor_loss"].sum() / table[column].sum())
    return with_fingerprint(summary, fingerprint_of(table))


def risk_validation_metrics(risk_validation_summary: dict[str, Any]) -> dict[str, dict]:
    """The summary as MLflow metrics (step 0): ``spearman_<damage|gain>.<statistic>``,
    ``p_value_<damage|gain>.<statistic>``, and the dense loss, damage and gain totals.
    """
    metrics = {}
    for outcome, by_statistic in risk_validation_summary["correlations"].items():
        short = OUTCOMES[outcome]
        for name, value in by_statistic.items():
            if value["rho"] is not None:
                metrics[f"spearman_{short}.{name}"] = value["rho"]
                metrics[f"p_value_{short}.{name}"] = value["p_value"]
    for key in (
        "layers",
        "examples",
        "dense_loss",
        "dense_accuracy",
        "svd_loss_increase_sum",
        f"{WEIGHTED_SOLVER}_loss_increase_sum",
        "weighted_gain_sum",
        "svd_curvature_damage_sum",
        "svd_first_order_abs_sum",
        "svd_taylor_loss_sum_rel_measured",
        "svd_taylor_loss_sum_rel_curvature",
        "seconds",
    ):
        value = risk_validation_summary.get(key)
        if value is not None:
            metrics[key] = float(value)
    return {key: {"value": float(value), "step": 0} for key, value in metrics.items()}


def plot_risk_validation(
    risk_validation_table: pd.DataFrame, risk_validation_summary: dict[str, Any]
) -> Figure:
    """φ (log x) against SVD's damage, the weighted gain (and the curvature damage when measured),
    points coloured by module kind, Spearman ρ in the titles; further panels do the same for the
    best predictor of each outcome when that is not φ.
    """
    table = risk_validation_table
    correlations = risk_validation_summary["correlations"]
    best = risk_validation_summary["best_predictor"]
    panels = [("phi", outcome) for outcome in correlations if "phi" in correlations[outcome]]
    panels += [
        (best[outcome], outcome)
        for outcome in correlations
        if best[outcome] is not None and best[outcome] != "phi"
    ]
    if not panels:
        raise ValueError("the summary has no correlation to plot (no statistic in layer_risk)")
    kinds = ordered_kinds(table["kind"])
    colours = {kind: f"C{index % 10}" for index, kind in enumerate(kinds)}
    rows = math.ceil(len(panels) / 2)
    figure = Figure(figsize=(11, 4.2 * rows))
    grid = figure.subplots(rows, 2, squeeze=False)
    labels = {
        "svd_curvature_damage": "SVD curvature damage (even part)",
        "svd_loss_increase": "SVD damage (val. loss increase)",
        "weighted_gain": (f"weighted gain (SVD − {WEIGHTED_SOLVER} loss increase)"),
    }
    for axes, (statistic, outcome) in zip(grid.flat, panels, strict=False):
        for kind in kinds:
            rows_of_kind = table[table["kind"] == kind]
            axes.scatter(
                rows_of_kind[statistic],
                rows_of_kind[outcome],
                label=kind,
                color=colours[kind],
                s=28,
                alpha=0.85,
            )
        x = table[statistic].to_numpy(dtype=float)
        if np.all(x[np.isfinite(x)] > 0):
            axes.set_xscale("log")
        y = np.abs(table[outcome].to_numpy(dtype=float))
        nonzero = y[np.isfinite(y) & (y > 0)]
        if nonzero.size:
            axes.set_yscale("symlog", linthresh=float(np.median(nonzero)))
        axes.axhline(0.0, color="grey", linewidth=0.8)
        value = correlations[outcome][statistic]
        rho = "n/a" if value["rho"] is None else f"{value['rho']:.2f} (p = {value['p_value']:.2g})"
        prefix = "best predictor: " if statistic == best[outcome] else ""
        axes.set_title(
            f"{prefix}{statistic} vs {OUTCOMES[outcome]}: Spearman ρ = {rho}, n = {value['n']}",
            fontsize=9,
        )
        axes.set_xlabel(statistic + (" (log)" if axes.get_xscale() == "log" else ""))
        axes.set_ylabel(labels[outcome])
    for axes in list(grid.flat)[len(panels) :]:
        axes.set_visible(False)
    grid.flat[0].legend(fontsize=8, title="module kind", title_fontsize=8)
    figure.suptitle(
        f"Does the risk statistic predict SVD damage? {len(table)} layers, each compressed alone, "
        f"{int(table['examples'].iloc[0])} validation examples"
    )
    figure.tight_layout()
    return figure


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
