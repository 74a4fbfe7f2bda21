"""Nodes of ``svd_risk``: risk statistics per layer, their per-model summary, and a heatmap of
the statistic ``params:svd_risk`` picks."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import CompressionParams, SvdRiskParams
from weighted_lowrank.lowrank.architectures import default_target_names
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.fisher import validate_fisher
from weighted_lowrank.lowrank.risk import layer_statistics, risk_summary
from weighted_lowrank.lowrank.targets import ordered_kinds
from weighted_lowrank.pipelines.fisher_estimation.nodes import recorded_num_examples

#: How each statistic is named in plot titles.
STATISTIC_LABELS = {
    "phi": "φ(W) = Var(I / mean I)",
    "svd_kronecker_loss": "SVD's predicted loss increase ½ tr(ΔWᵀGΔWA), nats/example",
    "svd_taylor_loss": "SVD's predicted loss increase ½ Σ I ΔW² / N, nats/example",
}


def compute_layer_risk(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    calibration_statistics: dict[str, Any],
    svd_risk: SvdRiskParams,
    compression: CompressionParams,
    device: str,
) -> pd.DataFrame:
    """One row of risk statistics per Fisher tensor at the solvers' budget, stamped with the
    fine-tuned model's fingerprint (``layer_statistics`` refuses a statistic without its inputs).
    """
    model = fine_tuned_model.model
    fisher, metadata = fisher_information["tensors"], fisher_information["metadata"]
    modules = validate_fisher(model, fisher, targets=_recorded_targets(metadata, model))
    weights = {f"{name}.weight": module.weight.detach().cpu() for name, module in modules.items()}
    rows = layer_statistics(
        weights,
        fisher,
        budget=compression.budget,
        statistic=svd_risk.statistic,
        threshold=svd_risk.threshold,
        top_fraction=svd_risk.top_fraction,
        compare_solvers=svd_risk.compare_solvers,
        num_examples=recorded_num_examples(metadata),
        device=str(resolve_device(device)),
        calibration=(calibration_statistics or {}).get("tensors") or {},
    )
    return with_fingerprint(pd.DataFrame(rows), model_fingerprint(model))


def _recorded_targets(metadata: dict[str, str], model: Any) -> Any:
    """The targets fisher_estimation recorded, so that missing tensors are caught (null: the
    model's default targets)."""
    if "targets" not in metadata:
        return None
    targets = json.loads(metadata["targets"])
    return default_target_names(model) if targets is None else targets


def summarize_risk(layer_risk: pd.DataFrame, svd_risk: SvdRiskParams) -> dict[str, Any]:
    """Per-model aggregates of the risk table (JSON), with the table's lineage."""
    summary = risk_summary(
        layer_risk.to_dict(orient="records"),
        statistic=svd_risk.statistic,
        threshold=svd_risk.threshold,
    )
    record = {key: _json_safe(value) for key, value in summary.items()}
    return with_fingerprint(record, fingerprint_of(layer_risk))


def plot_risk_heatmap(layer_risk: pd.DataFrame, svd_risk: SvdRiskParams) -> Figure:
    """The risk statistic per layer × module kind on a log colour scale; high-risk cells
    outlined, non-positive ones blank."""
    statistic, threshold = svd_risk.statistic, svd_risk.threshold
    label = STATISTIC_LABELS.get(statistic, statistic)
    kinds = ordered_kinds(layer_risk["kind"])
    layers = sorted(set(layer_risk["layer"]))
    grid = layer_risk.pivot_table(index="layer", columns="kind", values=statistic, aggfunc="max")
    grid = grid.reindex(index=layers, columns=kinds)
    values = grid.to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    low, high = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
    figure = Figure(figsize=(1.3 * len(kinds) + 2.5, 0.5 * len(layers) + 2))
    axes = figure.subplots()
    image = axes.imshow(
        np.where(values > 0, values, np.nan),
        cmap="viridis",
        norm=LogNorm(vmin=low, vmax=max(high, low * 1.001)),
        aspect="auto",
    )
    for row in range(len(layers)):
        for column in range(len(kinds)):
            value = values[row, column]
            if math.isnan(value):
                continue
            dark = value > 0 and image.norm(value) <= 0.6  # white text on the dark end
            colour = "white" if dark else "black"
            axes.text(column, row, f"{value:.3g}", ha="center", va="center", fontsize=8, c=colour)
            if value >= threshold:
                cell = (column - 0.5, row - 0.5)
                axes.add_patch(Rectangle(cell, 1, 1, fill=False, edgecolor="red", linewidth=2))
    axes.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) if layer >= 0 else "–" for layer in layers])
    axes.set_xlabel("module kind")
    axes.set_ylabel("encoder layer")
    axes.set_title(f"{label}; outlined: high risk ({statistic} ≥ {threshold:g})")
    figure.colorbar(image, ax=axes, label=f"{statistic} (log scale)")
    return figure


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
