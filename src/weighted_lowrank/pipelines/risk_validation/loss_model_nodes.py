"""Nodes of ``risk_validation`` that read ``loss_model_table``: which loss model predicts damage?

The primary outcome is the measured KL; the loss increase (``vs_loss_increase``) holds a
first-order term no quadratic predicts. Agreement is Spearman's ρ and the ratio predicted /
measured where the measurement is positive (a quadratic form is never negative).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.lowrank.loss_models import LOSS_MODELS, REQUIRED_STATISTICS

from .statistic_nodes import finite, largest_rho, spearman


def agreement(predicted: pd.Series, measured: pd.Series) -> dict[str, float | int | None]:
    """:func:`spearman` of ``predicted`` vs ``measured``, and the median and quartiles of
    predicted / measured over the ``ratio_n`` rows whose measurement is positive."""
    result: dict[str, float | int | None] = dict(spearman(predicted, measured))
    predicted, measured = predicted.to_numpy(dtype=float), measured.to_numpy(dtype=float)
    positive = np.isfinite(predicted) & np.isfinite(measured) & (measured > 0)
    ratios = predicted[positive] / measured[positive]
    quartiles = np.quantile(ratios, [0.25, 0.5, 0.75]) if ratios.size else [None] * 3
    result.update(
        {
            "ratio_median": finite(quartiles[1]),
            "ratio_q25": finite(quartiles[0]),
            "ratio_q75": finite(quartiles[2]),
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
    loss_model_table: pd.DataFrame, risk_validation_table: pd.DataFrame, *, reference: str
) -> dict[str, Any]:
    """Each loss model's agreement with the KL and (``vs_loss_increase``) the loss."""
    table = loss_model_table
    loss_models = list(dict.fromkeys(table["loss_model"]))
    summary: dict[str, Any] = {
        "loss_models": loss_models,
        "skipped_loss_models": {
            model: list(REQUIRED_STATISTICS[model])
            for model in LOSS_MODELS
            if model not in loss_models
        },
        "solvers": list(dict.fromkeys(table["solver"])),
        "layers": int(table.loc[table["scope"] == "layer", "module"].nunique()),
        "examples": int(table["examples"].iloc[0]),
        "dense_loss": float(table["dense_loss"].iloc[0]),
        "outcome": "measured_kl",
        **_block(table, risk_validation_table, "measured_kl", reference),
        "vs_loss_increase": _block(table, risk_validation_table, "measured", reference),
    }
    return with_fingerprint(summary, fingerprint_of(table))


def _block(
    table: pd.DataFrame, risk_validation_table: pd.DataFrame, measured: str, reference: str
) -> dict[str, Any]:
    """:func:`agreement` with ``measured`` per loss model, over layers and whole models."""
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
                    ratio: finite(row[ratio]),
                }
                for _, row in rows.iterrows()
            },
        }
    best = largest_rho({model: value["pooled"] for model, value in per_layer.items()})
    return {
        "per_layer": per_layer,
        "whole_model": whole_model,
        "best_loss_model": best,
        "phi_comparison": phi_comparison(layers, risk_validation_table, best, measured, reference),
    }


def phi_comparison(
    layers: pd.DataFrame,
    risk_validation_table: pd.DataFrame,
    loss_model: str | None,
    measured: str,
    reference: str,
) -> dict[str, Any] | None:
    """Spearman of φ and of ``loss_model`` with ``reference``'s single-layer damage."""
    if loss_model is None or "phi" not in risk_validation_table.columns:
        return None
    chosen = layers[(layers["solver"] == reference) & (layers["loss_model"] == loss_model)]
    rows = chosen.merge(
        risk_validation_table[["module", "phi"]], on="module", validate="one_to_one"
    )
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
            f"{loss_model} {'predicts' if better else 'does not predict'} {reference.upper()}'s "
            "per-layer "
            f"{MEASUREMENTS[measured][1]} better than φ: Spearman {_rho(model)} vs φ {_rho(phi)}, "
            f"n = {model['n']} layers (the same rows; the difference is not tested for "
            "significance)"
        ),
    }


def loss_model_metrics(loss_model_summary: dict[str, Any], *, reference: str) -> dict[str, dict]:
    """The summary as MLflow metrics (step 0; names in conf/base/catalog_risk_validation.yml)."""
    metrics: dict[str, float | None] = {}
    for block, suffix in (
        (loss_model_summary, "_kl"),
        (loss_model_summary["vs_loss_increase"], ""),
    ):
        names = {"rho": f"spearman{suffix}", "p_value": f"p_value{suffix}"}
        names |= {f"ratio_{part}": f"ratio{suffix}_{part}" for part in ("median", "q25", "q75")}
        for model, value in block["per_layer"].items():
            metrics |= {f"{model}.{names[key]}": value["pooled"][key] for key in names}
            for solver, by_solver in value["by_solver"].items():
                for key in ("rho", "p_value"):
                    metrics[f"{model}.{solver}.{names[key]}"] = by_solver[key]
            for key in ("rho", "p_value", "ratio_median"):
                metrics[f"{model}.whole_model.{names[key]}"] = block["whole_model"][model][key]
        comparison = block["phi_comparison"]
        if comparison is not None:
            metrics[f"phi_{reference}.spearman{suffix}"] = comparison["phi"]["rho"]
            metrics[f"best_{reference}.spearman{suffix}"] = comparison["best"]["rho"]
            metrics[f"beats_phi{suffix}"] = float(comparison["loss_model_better"])
    return {
        key: {"value": float(value), "step": 0}
        for key, value in metrics.items()
        if value is not None
    }


def plot_loss_models(loss_model_table: pd.DataFrame, loss_model_summary: dict[str, Any]) -> Figure:
    """Predicted against measured per loss model; KL on top, loss increase below."""
    table = loss_model_table
    loss_models = loss_model_summary["loss_models"]
    solvers = loss_model_summary["solvers"]
    colours = {solver: f"C{index % 10}" for index, solver in enumerate(solvers)}
    outcomes = [
        ("measured_kl", loss_model_summary),
        ("measured", loss_model_summary["vs_loss_increase"]),
    ]
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
    """Log axes where every value is positive (symlog for measured otherwise); y = x where the
    ranges overlap (else the scales differ by more than either's spread, as the axes show)."""
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
