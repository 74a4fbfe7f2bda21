"""Nodes of ``svd_risk``: risk statistics per layer, their per-model summary, and a heatmap."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fisher import model_fingerprint, validate_fisher
from weighted_lowrank.lowrank.risk import DEFAULT_PHI_THRESHOLD, layer_statistics, risk_summary
from weighted_lowrank.lowrank.targets import DEFAULT_TARGETS

#: Heatmap column order for BERT-style layers (other kinds follow alphabetically).
KIND_ORDER = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")


def compute_layer_risk(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    svd_risk: dict[str, Any],
    budget: float,
    device: str,
) -> pd.DataFrame:
    """One row of risk statistics per Fisher tensor (see ``layer_statistics``)."""
    if not isinstance(fisher_information, dict) or "tensors" not in fisher_information:
        raise ValueError(
            "fisher_information must be {'tensors': {...}, 'metadata': {...}} as written by the "
            f"fisher_estimation pipeline, got {type(fisher_information).__name__}"
        )
    model = fine_tuned_model.model
    fisher = fisher_information["tensors"]
    metadata = fisher_information.get("metadata") or {}
    modules = validate_fisher(model, fisher, targets=_recorded_targets(metadata))
    expected = metadata.get("model_fingerprint")
    if expected is not None and expected != model_fingerprint(model):
        raise ValueError(
            f"fisher_information was estimated on model {expected}, but fine_tuned_model is "
            f"{model_fingerprint(model)}; rerun fisher_estimation or pin both with --load-versions"
        )
    weights = {f"{name}.weight": module.weight.detach().cpu() for name, module in modules.items()}
    rows = layer_statistics(
        weights,
        fisher,
        budget=budget,
        phi_threshold=svd_risk.get("phi_threshold", DEFAULT_PHI_THRESHOLD),
        top_fraction=svd_risk.get("top_fraction", 0.01),
        compare_solvers=bool(svd_risk.get("compare_solvers", True)),
        device=str(resolve_device(device)),
    )
    return pd.DataFrame(rows)


def _recorded_targets(metadata: dict[str, str]) -> Any:
    """The targets fisher_estimation recorded (JSON), so that missing tensors are caught."""
    if "targets" not in metadata:
        return None
    try:
        targets = json.loads(metadata["targets"])
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"fisher_information metadata 'targets' is not JSON: {metadata['targets']!r}"
        ) from exc
    # null means the default targets, which must then all be present.
    return DEFAULT_TARGETS if targets is None else targets


def summarize_risk(layer_risk: pd.DataFrame, svd_risk: dict[str, Any]) -> dict[str, Any]:
    """Per-model aggregates of the risk table (JSON)."""
    summary = risk_summary(
        layer_risk.to_dict(orient="records"),
        phi_threshold=svd_risk.get("phi_threshold", DEFAULT_PHI_THRESHOLD),
    )
    return {key: _json_safe(value) for key, value in summary.items()}


def plot_risk_heatmap(layer_risk: pd.DataFrame, svd_risk: dict[str, Any]) -> Figure:
    """φ(W) per layer × module kind on a log colour scale; high-risk cells are outlined."""
    threshold = svd_risk.get("phi_threshold", DEFAULT_PHI_THRESHOLD)
    kinds = [kind for kind in KIND_ORDER if kind in set(layer_risk["kind"])]
    kinds += sorted(set(layer_risk["kind"]) - set(kinds))
    layers = sorted(set(layer_risk["layer"]))
    grid = layer_risk.pivot_table(index="layer", columns="kind", values="phi", aggfunc="max")
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
            phi = values[row, column]
            if math.isnan(phi):
                continue
            bright = phi > 0 and image.norm(phi) > 0.6  # dark text on the yellow end
            axes.text(
                column,
                row,
                f"{phi:.3g}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if bright else "white",
            )
            if phi >= threshold:
                axes.add_patch(
                    Rectangle(
                        (column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2
                    )
                )
    axes.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) if layer >= 0 else "–" for layer in layers])
    axes.set_xlabel("module kind")
    axes.set_ylabel("encoder layer")
    axes.set_title(f"φ(W) = Var(I / mean I); outlined: high risk (φ ≥ {threshold:g})")
    figure.colorbar(image, ax=axes, label="φ(W) (log scale)")
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
