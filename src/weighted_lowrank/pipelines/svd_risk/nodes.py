"""Nodes of ``svd_risk``: risk statistics per layer, their per-model summary, and a heatmap.

Parameters (``params:svd_risk``): ``statistic`` (which column of the table drives ``risk``, one of
:data:`~weighted_lowrank.lowrank.risk.RISK_STATISTICS`), ``thresholds`` (``{statistic: value}``;
a layer is high risk when its statistic ≥ the selected statistic's threshold), ``top_fraction``
and ``compare_solvers`` (see :func:`~weighted_lowrank.lowrank.risk.layer_statistics`).
"""

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
from weighted_lowrank.lowrank.fisher import check_fisher_information, validate_fisher
from weighted_lowrank.lowrank.risk import (
    RISK_STATISTICS,
    check_risk_statistic,
    layer_statistics,
    risk_summary,
)
from weighted_lowrank.lowrank.targets import DEFAULT_TARGETS, ordered_kinds
from weighted_lowrank.parameters import check_keys

SVD_RISK_KEYS = ("statistic", "thresholds", "top_fraction", "compare_solvers")
#: How each statistic is named in plot titles.
STATISTIC_LABELS = {"phi": "φ(W) = Var(I / mean I)"}


def risk_rule(svd_risk: dict[str, Any], num_examples: int | None = 1) -> tuple[str, float]:
    """``(statistic, threshold)`` that assign the high/low ``risk`` column, checked."""
    hint = (
        "; phi_threshold is now thresholds.phi (with statistic: phi)"
        if "phi_threshold" in svd_risk
        else ""
    )
    check_keys("svd_risk", svd_risk, SVD_RISK_KEYS, hint)
    statistic = check_risk_statistic(
        svd_risk.get("statistic", "phi"),
        bool(svd_risk.get("compare_solvers", True)),
        num_examples,
    )
    thresholds = svd_risk.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise ValueError(
            f"svd_risk.thresholds must map statistic names to numbers, got {thresholds!r}"
        )
    unknown = sorted(set(thresholds) - set(RISK_STATISTICS))
    if unknown:
        raise ValueError(
            f"svd_risk.thresholds names unknown statistics {unknown}; expected some of "
            f"{list(RISK_STATISTICS)}"
        )
    threshold = thresholds.get(statistic)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or math.isnan(threshold)
    ):
        raise ValueError(
            f"svd_risk.thresholds.{statistic} must be a number (the selected statistic "
            f"{statistic!r} needs a threshold), got {threshold!r}"
        )
    return statistic, float(threshold)


def compute_layer_risk(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    svd_risk: dict[str, Any],
    budget: float,
    device: str,
) -> pd.DataFrame:
    """One row of risk statistics per Fisher tensor (see ``layer_statistics``), plus the
    ``model_fingerprint`` of the fine-tuned model they were computed on."""
    model = fine_tuned_model.model
    fisher, metadata, fingerprint = check_fisher_information(fisher_information, model)
    modules = validate_fisher(model, fisher, targets=_recorded_targets(metadata))
    num_examples = _recorded_examples(metadata)
    statistic, threshold = risk_rule(svd_risk, num_examples)
    weights = {f"{name}.weight": module.weight.detach().cpu() for name, module in modules.items()}
    rows = layer_statistics(
        weights,
        fisher,
        budget=budget,
        statistic=statistic,
        threshold=threshold,
        top_fraction=svd_risk.get("top_fraction", 0.01),
        compare_solvers=bool(svd_risk.get("compare_solvers", True)),
        num_examples=num_examples,
        device=str(resolve_device(device)),
    )
    # Lets later consumers (risk_validation) check that the table belongs to their model.
    return pd.DataFrame(rows).assign(model_fingerprint=fingerprint)


def _recorded_examples(metadata: dict[str, str]) -> int | None:
    """The number of examples the Fisher sums over (metadata ``num_examples``), if recorded."""
    if "num_examples" not in metadata:
        return None
    try:
        count = int(metadata["num_examples"])
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"fisher_information metadata 'num_examples' is not an integer: "
            f"{metadata['num_examples']!r}"
        ) from exc
    if count < 1:
        raise ValueError(f"fisher_information metadata 'num_examples' is {count}; expected ≥ 1")
    return count


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
    statistic, threshold = risk_rule(svd_risk)
    summary = risk_summary(
        layer_risk.to_dict(orient="records"), statistic=statistic, threshold=threshold
    )
    return {key: _json_safe(value) for key, value in summary.items()}


def plot_risk_heatmap(layer_risk: pd.DataFrame, svd_risk: dict[str, Any]) -> Figure:
    """The risk statistic (φ by default) per layer × module kind on a log colour scale.

    Cells of high-risk layers are outlined; non-positive values are left blank.
    """
    statistic, threshold = risk_rule(svd_risk)
    if statistic not in layer_risk.columns:
        raise ValueError(
            f"layer_risk has no column {statistic!r} (svd_risk.statistic); it has "
            f"{list(layer_risk.columns)}"
        )
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
            bright = value > 0 and image.norm(value) > 0.6  # dark text on the yellow end
            axes.text(
                column,
                row,
                f"{value:.3g}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if bright else "white" if value > 0 else "black",
            )
            if value >= threshold:
                axes.add_patch(
                    Rectangle(
                        (column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2
                    )
                )
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
