"""Cheap per-layer statistics of an importance matrix that predict where plain SVD will hurt.

φ(W) (``fisher_variance``) is the population variance of the importance normalised by its mean,

    φ(W) = (1/|W|) Σ_ij (I_ij / Ī − 1)²,   Ī = (1/|W|) Σ_ij I_ij,

the squared coefficient of variation of I: scale-free, zero exactly when I is uniform (where SVD
is already optimal). Any of :data:`RISK_STATISTICS` can drive the ``risk`` column; the default,
``svd_kronecker_loss`` = ½ tr(ΔWᵀ G ΔW A) for ΔW = W − SVD_r(W), predicts the measured KL of the
36 MiniLM layers compressed alone with Spearman ρ = 0.87, where φ reaches 0.16 and
``svd_taylor_loss`` (the diagonal Fisher's) 0.54 (``risk_validation``; docs/METHOD.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from scipy import stats

from weighted_lowrank.lowrank.calibration import statistic_key
from weighted_lowrank.lowrank.loss_models import (
    REQUIRED_STATISTICS,
    LayerCurvature,
    predicted_loss_increase,
)
from weighted_lowrank.lowrank.objective import FactorizationResult, rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.solvers import factorize_batch
from weighted_lowrank.lowrank.targets import describe_module

#: "high" risk at φ(W) ≥ this: on a fine-tuned MiniLM it best separated layers where SVD's
#: weighted loss is at least twice two-sided FWSVD's (docs/METHOD.md).
DEFAULT_PHI_THRESHOLD = 50.0

#: "high" risk at ``svd_kronecker_loss`` ≥ this (nats per example): on the default MiniLM it
#: separates the 4 layers whose SVD moves the predictions most (docs/METHOD.md).
DEFAULT_KRONECKER_THRESHOLD = 0.013

#: The statistics that need the number of examples the Fisher sums over (and ``compare_solvers``).
TAYLOR_STATISTICS = ("svd_taylor_loss", "fwsvd_taylor_gain")
#: The statistics that need the per-layer SVD and FWSVD (``compare_solvers``).
SOLVER_STATISTICS = ("svd_error_alignment", "svd_loss_rel_fwsvd", *TAYLOR_STATISTICS)
#: Statistics that may drive the ``risk`` column (larger = riskier for each).
RISK_STATISTICS = ("svd_kronecker_loss", "phi", "top_share", "max_to_mean", *SOLVER_STATISTICS)
#: The statistics that need every layer's A and G (:data:`KRONECKER_NEEDS`), not ``compare_solvers``.
KRONECKER_STATISTICS = ("svd_kronecker_loss",)
KRONECKER_NEEDS = REQUIRED_STATISTICS["kronecker"]


def fisher_variance(importance: torch.Tensor) -> float:
    """φ(W): variance of ``importance / mean(importance)`` over all entries (see module docstring)."""
    values = _checked(importance).double()
    mean = values.mean()
    return float(((values / mean - 1.0) ** 2).mean())


def top_share(importance: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the total importance held by the largest ``⌈fraction·|W|⌉`` entries."""
    values = _checked(importance).double().flatten()
    count = max(1, math.ceil(fraction * values.numel()))
    return float(values.topk(count).values.sum() / values.sum())


def max_to_mean(importance: torch.Tensor) -> float:
    """Largest importance entry over the mean entry (1 for uniform importance)."""
    values = _checked(importance).double()
    return float(values.max() / values.mean())


def risk_level(value: float, threshold: float = DEFAULT_PHI_THRESHOLD) -> str:
    """``"high"`` when ``value ≥ threshold`` else ``"low"`` (NaN is ``"low"``)."""
    return "high" if value >= threshold else "low"


def check_risk_statistic(
    statistic: str,
    compare_solvers: bool = True,
    num_examples: int | None = 1,
    missing_calibration: Sequence[str] = (),
) -> str:
    """``statistic`` once it is known and computable from what is given (``missing_calibration``:
    the absent calibration keys), else a ``ValueError`` saying what it needs."""
    if statistic not in RISK_STATISTICS:
        raise ValueError(
            f"risk statistic {statistic!r} is unknown; expected one of {list(RISK_STATISTICS)}"
        )
    if statistic in SOLVER_STATISTICS and not compare_solvers:
        raise ValueError(
            f"risk statistic {statistic!r} needs compare_solvers: true (it comes from the "
            f"per-layer SVD); without it choose one of "
            f"{[name for name in RISK_STATISTICS if name not in SOLVER_STATISTICS]}"
        )
    if statistic in TAYLOR_STATISTICS and num_examples is None:
        raise ValueError(
            f"risk statistic {statistic!r} needs the number of examples the Fisher sums over "
            "(fisher metadata 'num_examples'), which is unknown"
        )
    if statistic in KRONECKER_STATISTICS and missing_calibration:
        shown = list(missing_calibration[:4])
        more = len(missing_calibration) - len(shown)
        raise ValueError(
            f"risk statistic {statistic!r} needs the calibration statistics input_moment (A) and "
            f"output_moment (G) of every layer; calibration_statistics lacks {shown}"
            + (f" and {more} more" if more > 0 else "")
            + "; run fisher_estimation with statistics including input_moment and output_moment "
            f"(conf/base/parameters_fisher_estimation.yml), or choose another statistic of "
            f"{[name for name in RISK_STATISTICS if name not in KRONECKER_STATISTICS]}"
        )
    return statistic


def layer_statistics(
    weights: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    budget: float = 0.5,
    statistic: str = "phi",
    threshold: float = DEFAULT_PHI_THRESHOLD,
    top_fraction: float = 0.01,
    compare_solvers: bool = True,
    num_examples: int | None = None,
    device: str = "cpu",
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> list[dict]:
    """One row of risk statistics per Fisher key, in its order. For SVD's residual R, with
    ``compare_solvers``: ``svd_error_alignment`` = Σ I R² / (Ī Σ R²), ``svd_loss_rel_fwsvd``, and
    with N ``svd_taylor_loss`` = ½ Σ I R² / N, ``fwsvd_taylor_gain``; with A and G,
    ``svd_kronecker_loss`` = ½ tr(RᵀGRA)."""
    keys = list(fisher)
    modules = [key.removesuffix(".weight") for key in keys]
    calibration = calibration or {}
    missing_calibration = [
        key
        for key in (statistic_key(module, name) for module in modules for name in KRONECKER_NEEDS)
        if key not in calibration
    ]
    check_risk_statistic(statistic, compare_solvers, num_examples, missing_calibration)
    missing = [key for key in keys if key not in weights]
    if missing:
        raise ValueError(f"weights lack the Fisher keys {missing[:5]}")
    rows = [
        _importance_row(module, key, weights[key], fisher[key], budget, top_fraction)
        for module, key in zip(modules, keys, strict=True)
    ]
    matrices = [weights[key].detach().float() for key in keys]
    curvatures = None if missing_calibration else _curvatures(modules, matrices, calibration)
    importances = [fisher[key].float() for key in keys]
    ranks = [row["rank"] for row in rows]
    if compare_solvers or curvatures is not None:
        svd = factorize_batch(matrices, importances, ranks, solver="svd", device=device)
    if curvatures is not None:
        for row, matrix, svd_result, curvature in zip(rows, matrices, svd, curvatures, strict=True):
            left, right = svd_result.left.double().cpu(), svd_result.right.double().cpu()
            residual = matrix.double() - left @ right  # SVD's R: ½ tr(RᵀGRA)
            loss = predicted_loss_increase(residual, curvature, ["kronecker"])
            row["svd_kronecker_loss"] = loss["kronecker"]
    if compare_solvers:
        fwsvd = factorize_batch(matrices, importances, ranks, solver="fwsvd", device=device)
        for row, matrix, importance, svd_result, fwsvd_result in zip(
            rows, matrices, importances, svd, fwsvd, strict=True
        ):
            row.update(_solver_columns(matrix, importance, svd_result, fwsvd_result, num_examples))
    for row in rows:
        row["risk"] = risk_level(row[statistic], threshold)
    return rows


def _importance_row(
    module: str,
    key: str,
    weight: torch.Tensor,
    importance: torch.Tensor,
    budget: float,
    top_fraction: float,
) -> dict:
    """The columns of one layer that need only its weight's shape and its importance."""
    if weight.dim() != 2 or tuple(weight.shape) != tuple(importance.shape):
        raise ValueError(
            f"{key}: importance shape {tuple(importance.shape)} does not match weight shape "
            f"{tuple(weight.shape)}"
        )
    layer, kind = describe_module(module)
    return {
        "module": module,
        "layer": -1 if layer is None else layer,
        "kind": kind,
        "out_features": int(weight.shape[0]),
        "in_features": int(weight.shape[1]),
        "rank": rank_for_budget(tuple(weight.shape), budget),
        "phi": fisher_variance(importance),
        "top_share": top_share(importance, top_fraction),
        "max_to_mean": max_to_mean(importance),
    }


def _solver_columns(
    matrix: torch.Tensor,
    importance: torch.Tensor,
    svd: FactorizationResult,
    fwsvd: FactorizationResult,
    num_examples: int | None,
) -> dict[str, float]:
    """SVD's error alignment and loss against FWSVD's, and (with N) their Taylor estimates."""
    # SVD's error under uniform importance of the same total: the unweighted loss × mean I.
    uniform = float(importance.double().mean()) * weighted_loss(matrix, None, svd.left, svd.right)
    columns = {
        "svd_error_alignment": svd.loss / uniform if uniform > 0 else 1.0,
        "svd_loss_rel_fwsvd": svd.loss / fwsvd.loss if fwsvd.loss > 0 else 1.0,
    }
    if num_examples is not None:
        columns["svd_taylor_loss"] = 0.5 * svd.loss / num_examples
        columns["fwsvd_taylor_gain"] = 0.5 * (svd.loss - fwsvd.loss) / num_examples
    return columns


def _curvatures(
    modules: list[str],
    weights: list[torch.Tensor],
    calibration: Mapping[str, torch.Tensor],
) -> list[LayerCurvature]:
    """Each layer's A and G, once their shapes fit its weight (checked before any SVD)."""
    curvatures = []
    for module, weight in zip(modules, weights, strict=True):
        out_features, in_features = weight.shape
        values = {name: calibration[statistic_key(module, name)] for name in KRONECKER_NEEDS}
        expected = {
            "input_moment": (in_features, in_features),
            "output_moment": (out_features, out_features),
        }
        for name, value in values.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[name]:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"calibration statistic {statistic_key(module, name)!r} has shape {shape}; "
                    f"the weight of shape {tuple(weight.shape)} needs {expected[name]}"
                )
        curvatures.append(LayerCurvature(**values))
    return curvatures


def risk_summary(
    rows: list[dict], statistic: str = "phi", threshold: float = DEFAULT_PHI_THRESHOLD
) -> dict:
    """Per-model aggregates of :func:`layer_statistics` rows (JSON-friendly)."""
    phis = [row["phi"] for row in rows]
    highest = max(rows, key=lambda row: row["phi"])
    by_kind: dict[str, list[float]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row["phi"])
    summary = {
        "layers": len(rows),
        "risk_statistic": statistic,
        "risk_threshold": threshold,
        "high_risk_layers": sum(row["risk"] == "high" for row in rows),
        "high_risk_modules": [row["module"] for row in rows if row["risk"] == "high"],
        "phi_mean": sum(phis) / len(phis),
        "phi_median": float(torch.tensor(phis, dtype=torch.float64).median()),
        "phi_max": highest["phi"],
        "phi_max_module": highest["module"],
        "phi_mean_by_kind": {kind: sum(v) / len(v) for kind, v in by_kind.items()},
    }
    if all("svd_loss_rel_fwsvd" in row for row in rows):
        ratios = [row["svd_loss_rel_fwsvd"] for row in rows]
        summary["svd_loss_rel_fwsvd_mean"] = sum(ratios) / len(ratios)
        summary["svd_loss_rel_fwsvd_max"] = max(ratios)
        summary["phi_spearman_svd_loss_rel_fwsvd"] = spearman(phis, ratios)
    if all("svd_kronecker_loss" in row for row in rows):
        # The layers' predictions add up only if their errors do not interact (docs/METHOD.md).
        losses = [row["svd_kronecker_loss"] for row in rows]
        riskiest = max(rows, key=lambda row: row["svd_kronecker_loss"])
        summary["svd_kronecker_loss_sum"] = sum(losses)
        summary["svd_kronecker_loss_max"] = riskiest["svd_kronecker_loss"]
        summary["svd_kronecker_loss_max_module"] = riskiest["module"]
        summary["phi_spearman_svd_kronecker_loss"] = spearman(phis, losses)
    return summary


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman ρ as scipy computes it; NaN for fewer than two pairs or a constant input."""
    if len(first) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(first, second).statistic)


def _checked(importance: torch.Tensor) -> torch.Tensor:
    if importance.numel() == 0:
        problem = "is empty"
    elif not torch.isfinite(importance).all():
        problem = "holds NaN or inf"
    elif (importance < 0).any():
        problem = "has negative entries"
    elif not (importance > 0).any():
        problem = "is all zero (φ and shares are undefined)"
    else:
        return importance
    raise ValueError(f"importance {problem}; expected finite values ≥ 0, not all zero")
