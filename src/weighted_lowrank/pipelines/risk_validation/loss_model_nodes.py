"""Nodes of ``risk_validation`` that read ``loss_model_table``: which loss model predicts damage?

The primary outcome is the measured KL(p_dense ‖ p_compressed) (``measured_kl``), the quantity the
quadratic ½ vec(ΔW)ᵀ F vec(ΔW) approximates (no first-order term, never negative); the measured
validation-loss increase (``measured``) is compared too, as a second block ``vs_loss_increase``:
it holds a first-order term g·ΔW that no quadratic predicts.

Agreement of a loss model with a measurement is read two ways: the Spearman correlation of
predicted and measured (does it rank layers by damage?) and the ratio predicted / measured (does
it get the scale right?). Ratios are taken only where the measurement is positive: a layer whose
compression *lowers* the validation loss has no meaningful ratio (a quadratic form is never
negative), and how many such rows there are is part of the answer (a KL is positive unless the
compressed model's predictions are the dense one's).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.lowrank.loss_models import LOSS_MODELS, REQUIRED_STATISTICS

from .nodes import spearman


def agreement(predicted: pd.Series, measured: pd.Series) -> dict[str, float | int | None]:
    """Spearman ρ, p and n of ``predicted`` vs ``measured``, and the median and quartiles of
    predicted / measured over the ``ratio_n`` rows whose measured increase is positive (None
    without such rows)."""
    result: dict[str, float | int | None] = dict(spearman(predicted, measured))
    predicted, measured = predicted.to_numpy(dtype=float), measured.to_numpy(dtype=float)
    positive = np.isfinite(predicted) & np.isfinite(measured) & (measured > 0)
    ratios = predicted[positive] / measured[positive]
    quartiles = np.quantile(ratios, [0.25, 0.5, 0.75]) if ratios.size else [None] * 3
    result.update(
        {
            "ratio_median": _number(quartiles[1]),
            "ratio_q25": _number(quartiles[0]),
            "ratio_q75": _number(quartiles[2]),
            "ratio_n": int(ratios.size),
            "negative_measured": int((measured <= 0).sum()),
        }
    )
    return result


#: The two outcomes: ``{column: (ratio column, words for the verdict and the plot)}``.
MEASUREMENTS = {
    "measured_kl": ("ratio_kl", "KL(p_dense ‖ p_compressed)"),
    "measured": ("ratio", "validation-loss increase"),
}


def summarize_loss_models(
    loss_model_table: pd.DataFrame, risk_validation_table: pd.DataFrame
) -> dict[str, Any]:
    """Per loss model: how well its prediction agrees with the measured KL and loss increase.

    Against the KL (``measured_kl``, the primary outcome): ``per_layer[model]``, :func:`agreement`
    over the single-layer rows pooled over solvers (``pooled``) and per solver (``by_solver``);
    ``whole_model[model]``, the same over the whole compressed models (one point per solver) with
    each model's ``predicted``, ``measured_kl`` and ``ratio_kl``; ``best_loss_model``, the largest
    pooled per-layer ρ; ``phi_comparison``, Spearman of φ (``layer_risk``) and of the best loss
    model against SVD's per-layer KL on the same rows, and the verdict.
    ``vs_loss_increase`` holds the same four keys against the validation-loss increase
    (``measured``; whole models with ``measured`` and ``ratio``). ``skipped_loss_models`` names
    the loss models the statistics did not allow, with what each needs.
    """
    table = loss_model_table
    layers = table[table["scope"] == "layer"]
    loss_models = list(dict.fromkeys(table["loss_model"]))
    solvers = list(dict.fromkeys(table["solver"]))
    kl = _block(table, risk_validation_table, "measured_kl")
    summary: dict[str, Any] = {
        "loss_models": loss_models,
        "skipped_loss_models": {
            model: list(REQUIRED_STATISTICS[model])
            for model in LOSS_MODELS
            if model not in loss_models
        },
        "solvers": solvers,
        "layers": int(layers["module"].nunique()),
        "examples": int(table["examples"].iloc[0]),
        "dense_loss": float(table["dense_loss"].iloc[0]),
        "outcome": "measured_kl",
        **kl,
        "vs_loss_increase": _block(table, risk_validation_table, "measured"),
    }
    return with_fingerprint(summary, fingerprint_of(table))


def _block(
    table: pd.DataFrame, risk_validation_table: pd.DataFrame, measured: str
) -> dict[str, Any]:
    """``per_layer``, ``whole_model``, ``best_loss_model`` and ``phi_comparison`` against the
    column ``measured`` of ``loss_model_table``."""
    ratio = MEASUREMENTS[measured][0]
    layers = table[table["scope"] == "layer"]
    models = table[table["scope"] == "model"]
    per_layer, whole_model = {}, {}
    for loss_model in dict.fromkeys(table["loss_model"]):
        rows = layers[layers["loss_model"] == loss_model]
        per_layer[loss_model] = {
            "pooled": agreement(rows["predicted"], rows[measured]),
            "by_solver": {
                solver: agreement(group["predicted"], group[measured])
                for solver, group in rows.groupby("solver", sort=False)
            },
        }
        rows = models[models["loss_model"] == loss_model]
        whole_model[loss_model] = {
            **agreement(rows["predicted"], rows[measured]),
            "by_solver": {
                row["solver"]: {
                    "predicted": float(row["predicted"]),
                    measured: float(row[measured]),
                    ratio: _number(row[ratio]),
                }
                for _, row in rows.iterrows()
            },
        }
    ranked = [
        (value["pooled"]["rho"], model)
        for model, value in per_layer.items()
        if value["pooled"]["rho"] is not None
    ]
    best = max(ranked)[1] if ranked else None
    return {
        "per_layer": per_layer,
        "whole_model": whole_model,
        "best_loss_model": best,
        "phi_comparison": phi_comparison(layers, risk_validation_table, best, measured),
    }


def phi_comparison(
    layers: pd.DataFrame,
    risk_validation_table: pd.DataFrame,
    loss_model: str | None,
    measured: str = "measured_kl",
) -> dict[str, Any] | None:
    """Spearman of φ and of ``loss_model``'s prediction against SVD's single-layer ``measured``
    (KL or loss increase), on the same rows (one per layer); None without φ in the risk table or
    a loss model."""
    if loss_model is None or "phi" not in risk_validation_table.columns:
        return None
    svd = layers[(layers["solver"] == "svd") & (layers["loss_model"] == loss_model)]
    rows = svd.merge(risk_validation_table[["module", "phi"]], on="module", validate="one_to_one")
    phi = spearman(rows["phi"], rows[measured])
    model = spearman(rows["predicted"], rows[measured])
    better = model["rho"] is not None and (phi["rho"] is None or model["rho"] > phi["rho"])
    return {
        "loss_model": loss_model,
        "outcome": measured,
        "phi": phi,
        "best": model,
        "loss_model_better": better,
        "verdict": (
            f"{loss_model} {'predicts' if better else 'does not predict'} SVD's per-layer "
            f"{MEASUREMENTS[measured][1]} better than φ: Spearman {_rho(model)} vs φ {_rho(phi)}, "
            f"n = {model['n']} layers (the same rows; the difference is not tested for "
            "significance)"
        ),
    }


def loss_model_metrics(loss_model_summary: dict[str, Any]) -> dict[str, dict]:
    """The summary as MLflow metrics (step 0), logged under ``risk_validation.loss_model.``.

    Against the KL: ``<model>.spearman_kl``, ``<model>.p_value_kl``, ``<model>.ratio_kl_median``
    / ``ratio_kl_q25`` / ``ratio_kl_q75`` (per layer, pooled over solvers),
    ``<model>.<solver>.spearman_kl`` / ``.p_value_kl``, ``<model>.whole_model.spearman_kl`` /
    ``.p_value_kl`` / ``.ratio_kl_median``, and ``phi_svd.spearman_kl``, ``best_svd.spearman_kl``,
    ``beats_phi_kl`` (1 or 0) from the φ comparison. Against the loss increase, the same names
    without ``_kl`` (``<model>.spearman``, ``<model>.ratio_median``, …, ``beats_phi``).
    """
    metrics: dict[str, float | None] = {}
    for block, suffix in (
        (loss_model_summary, "_kl"),
        (loss_model_summary.get("vs_loss_increase"), ""),
    ):
        if block is None:
            continue
        names = {
            "rho": f"spearman{suffix}",
            "p_value": f"p_value{suffix}",
            **{
                key: f"ratio{suffix}_{key[6:]}"
                for key in ("ratio_median", "ratio_q25", "ratio_q75")
            },
        }
        for model, value in block["per_layer"].items():
            for key in ("rho", "p_value", "ratio_median", "ratio_q25", "ratio_q75"):
                metrics[f"{model}.{names[key]}"] = value["pooled"][key]
            for solver, by_solver in value["by_solver"].items():
                for key in ("rho", "p_value"):
                    metrics[f"{model}.{solver}.{names[key]}"] = by_solver[key]
            whole = block["whole_model"][model]
            for key in ("rho", "p_value", "ratio_median"):
                metrics[f"{model}.whole_model.{names[key]}"] = whole[key]
        comparison = block["phi_comparison"]
        if comparison is not None:
            metrics[f"phi_svd.spearman{suffix}"] = comparison["phi"]["rho"]
            metrics[f"best_svd.spearman{suffix}"] = comparison["best"]["rho"]
            metrics[f"beats_phi{suffix}"] = float(comparison["loss_model_better"])
    return {
        key: {"value": float(value), "step": 0}
        for key, value in metrics.items()
        if value is not None
    }


def plot_loss_models(loss_model_table: pd.DataFrame, loss_model_summary: dict[str, Any]) -> Figure:
    """Predicted (x) against measured (y), one column per loss model: the top row against the KL
    (the primary outcome), the bottom row against the validation-loss increase (when the summary
    has its block). Single-layer points coloured by solver, whole models as stars, the line
    predicted = measured where the two ranges overlap, Spearman ρ in the titles. An axis is
    logarithmic where all its values are positive (the measured one symmetric-log otherwise, since
    compressing a layer can lower the loss).
    """
    table = loss_model_table
    loss_models = loss_model_summary["loss_models"]
    solvers = loss_model_summary["solvers"]
    colours = {solver: f"C{index % 10}" for index, solver in enumerate(solvers)}
    outcomes = [("measured_kl", loss_model_summary)]
    if loss_model_summary.get("vs_loss_increase") is not None:
        outcomes.append(("measured", loss_model_summary["vs_loss_increase"]))
    columns = len(loss_models)
    figure = Figure(figsize=(4.6 * columns, 4.4 * len(outcomes)))
    grid = figure.subplots(len(outcomes), columns, squeeze=False)
    for row_axes, (measured, block) in zip(grid, outcomes, strict=True):
        words = MEASUREMENTS[measured][1]
        for axes, loss_model in zip(row_axes, loss_models, strict=True):
            subset = table[table["loss_model"] == loss_model]
            for solver in solvers:
                for scope, marker, size in (("layer", "o", 22), ("model", "*", 150)):
                    points = subset[(subset["solver"] == solver) & (subset["scope"] == scope)]
                    axes.scatter(
                        points["predicted"],
                        points[measured],
                        color=colours[solver],
                        marker=marker,
                        s=size,
                        alpha=0.8,
                        edgecolors="black" if scope == "model" else "none",
                        label=solver if scope == "layer" else None,
                    )
            _scale_axes(axes, subset["predicted"].to_numpy(float), subset[measured].to_numpy(float))
            pooled = block["per_layer"][loss_model]["pooled"]
            whole = block["whole_model"][loss_model]
            axes.set_title(
                f"{loss_model} vs {'KL' if measured == 'measured_kl' else 'loss increase'}: "
                f"layers ρ = {_rho(pooled)}, n = {pooled['n']}\n"
                f"whole models ρ = {_rho(whole)}, n = {whole['n']}",
                fontsize=9,
            )
            axes.set_xlabel("predicted ΔL, nats/example" + _scale_note(axes.get_xscale()))
            axes.set_ylabel(f"measured {words}" + _scale_note(axes.get_yscale()), fontsize=9)
    grid[0, 0].legend(fontsize=8, title="solver (★ whole model)", title_fontsize=8)
    figure.suptitle(
        f"Which loss model predicts the damage? {loss_model_summary['layers']} layers each "
        f"compressed alone, and whole models; {loss_model_summary['examples']} validation "
        "examples; top: KL(p_dense ‖ p_compressed), bottom: validation-loss increase"
    )
    figure.tight_layout()
    return figure


def _scale_axes(axes: Any, predicted: np.ndarray, measured: np.ndarray) -> None:
    """Log axes where every value is positive (symlog for measured otherwise); the line y = x."""
    finite = predicted[np.isfinite(predicted)]
    if finite.size and np.all(finite > 0):
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())  # labels of 2·10ᵏ … overlap
    values = measured[np.isfinite(measured)]
    if values.size and np.all(values > 0):
        axes.set_yscale("log")
    elif np.any(values != 0):
        linthresh = float(np.median(np.abs(values[values != 0])))
        axes.set_yscale("symlog", linthresh=linthresh, linscale=2.0)
    axes.margins(0.08)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    # y = x where the predicted and the positive measured ranges overlap (none: the scales differ
    # by more than the spread of either, which the axes then show).
    x, y = finite[finite > 0], values[values > 0]
    if x.size and y.size and max(x.min(), y.min()) < min(x.max(), y.max()):
        line = np.geomspace(max(x.min(), y.min()), min(x.max(), y.max()), 50)
        axes.plot(
            line, line, color="grey", linestyle="--", linewidth=0.8, label="predicted = measured"
        )


def _scale_note(scale: str) -> str:
    return {"log": " (log)", "symlog": " (symlog)"}.get(scale, "")


def _rho(value: dict[str, Any]) -> str:
    if value["rho"] is None:
        return "n/a"
    return f"{value['rho']:+.3f} (p {value['p_value']:.2g})"


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
