"""Cheap per-layer statistics of an importance matrix that predict where plain SVD will hurt.

φ(W) (``fisher_variance``) is the population variance of the importance normalised by its mean,

    φ(W) = (1/|W|) Σ_ij (I_ij / Ī − 1)²,   Ī = (1/|W|) Σ_ij I_ij,

i.e. the squared coefficient of variation of I. It is invariant to the scale of I (the number of
examples, the loss scale), zero exactly when I is uniform (the case where SVD is already optimal
for the weighted objective), and grows as importance concentrates on few entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from weighted_lowrank.lowrank.objective import rank_for_budget
from weighted_lowrank.lowrank.solvers import factorize_batch
from weighted_lowrank.lowrank.targets import describe_module

#: A layer is "high" risk when φ(W) ≥ this. Chosen on a fine-tuned MiniLM's Fisher (docs/METHOD.md):
#: of the thresholds tried it best separated layers where SVD's weighted loss is at least twice
#: two-sided FWSVD's; φ is only a moderate predictor (value projections are counterexamples).
DEFAULT_PHI_THRESHOLD = 50.0

RISK_LEVELS = ("low", "high")


def fisher_variance(importance: torch.Tensor) -> float:
    """φ(W): variance of ``importance / mean(importance)`` over all entries (see module docstring)."""
    values = _checked(importance, "importance").double()
    mean = values.mean()
    return float(((values / mean - 1.0) ** 2).mean())


def top_share(importance: torch.Tensor, fraction: float = 0.01) -> float:
    """Share of the total importance held by the largest ``⌈fraction·|W|⌉`` entries."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    values = _checked(importance, "importance").double().flatten()
    count = max(1, math.ceil(fraction * values.numel()))
    return float(values.topk(count).values.sum() / values.sum())


def max_to_mean(importance: torch.Tensor) -> float:
    """Largest importance entry over the mean entry (1 for uniform importance)."""
    values = _checked(importance, "importance").double()
    return float(values.max() / values.mean())


def risk_level(phi: float, phi_threshold: float = DEFAULT_PHI_THRESHOLD) -> str:
    """``"high"`` when ``phi ≥ phi_threshold`` else ``"low"``."""
    return "high" if phi >= phi_threshold else "low"


def layer_statistics(
    weights: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    budget: float = 0.5,
    phi_threshold: float = DEFAULT_PHI_THRESHOLD,
    top_fraction: float = 0.01,
    compare_solvers: bool = True,
    device: str = "cpu",
) -> list[dict]:
    """One row of risk statistics per Fisher key (``"<module>.weight"``), in the Fisher's order.

    Columns: ``module``, ``layer``, ``kind``, ``out_features``, ``in_features``, ``rank`` (from
    ``budget``), ``phi`` (φ(W)), ``top_share`` (share of importance in the top ``top_fraction`` of
    entries), ``max_to_mean``, ``risk`` (low/high by ``phi_threshold``) and, with
    ``compare_solvers``: ``svd_error_alignment`` = Σ I R² / (Ī Σ R²) for SVD's residual R (1 when
    SVD's error falls on average-importance entries, > 1 when it hits important ones) and
    ``svd_loss_rel_fwsvd`` = SVD's weighted loss / two-sided FWSVD's at the same rank (≥ 1 means
    weighting pays). ``weights`` maps the same keys to the weight matrices.
    """
    if not fisher:
        raise ValueError("fisher is empty; expected one importance tensor per weight")
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1), got {budget}")
    missing = [key for key in fisher if key not in weights]
    if missing:
        raise ValueError(f"weights lack the Fisher keys {missing[:5]}")
    rows = []
    for key, importance in fisher.items():
        weight = weights[key]
        if weight.dim() != 2 or tuple(weight.shape) != tuple(importance.shape):
            raise ValueError(
                f"{key}: importance shape {tuple(importance.shape)} does not match weight shape "
                f"{tuple(weight.shape)}"
            )
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        layer, kind = describe_module(module)
        phi = fisher_variance(importance)
        rows.append(
            {
                "module": module,
                "layer": -1 if layer is None else layer,
                "kind": kind,
                "out_features": int(weight.shape[0]),
                "in_features": int(weight.shape[1]),
                "rank": rank_for_budget(tuple(weight.shape), budget),
                "phi": phi,
                "top_share": top_share(importance, top_fraction),
                "max_to_mean": max_to_mean(importance),
                "risk": risk_level(phi, phi_threshold),
            }
        )
    if compare_solvers:
        keys = list(fisher)
        matrices = [weights[key].detach().float() for key in keys]
        importances = [fisher[key].float() for key in keys]
        ranks = [row["rank"] for row in rows]
        svd = factorize_batch(matrices, importances, ranks, solver="svd", device=device)
        fwsvd = factorize_batch(matrices, importances, ranks, solver="fwsvd", device=device)
        for row, matrix, importance, svd_result, fwsvd_result in zip(
            rows, matrices, importances, svd, fwsvd, strict=True
        ):
            residual_sq = (
                matrix.double() - svd_result.left.double() @ svd_result.right.double()
            ) ** 2
            uniform = float(importance.double().mean() * residual_sq.sum())
            row["svd_error_alignment"] = svd_result.loss / uniform if uniform > 0 else 1.0
            row["svd_loss_rel_fwsvd"] = (
                svd_result.loss / fwsvd_result.loss if fwsvd_result.loss > 0 else 1.0
            )
    return rows


def risk_summary(rows: list[dict], phi_threshold: float = DEFAULT_PHI_THRESHOLD) -> dict:
    """Per-model aggregates of :func:`layer_statistics` rows (JSON-friendly)."""
    if not rows:
        raise ValueError("no layer rows to summarise")
    phis = [row["phi"] for row in rows]
    highest = max(rows, key=lambda row: row["phi"])
    by_kind: dict[str, list[float]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row["phi"])
    summary = {
        "layers": len(rows),
        "phi_threshold": phi_threshold,
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
        summary["phi_spearman_svd_loss_rel_fwsvd"] = _spearman(phis, ratios)
    return summary


def _spearman(first: list[float], second: list[float]) -> float:
    """Spearman rank correlation (ties broken by order; NaN for fewer than two rows)."""
    if len(first) < 2:
        return float("nan")
    ranks = [torch.tensor(values).argsort().argsort().double() for values in (first, second)]
    centred = [rank - rank.mean() for rank in ranks]
    denominator = float(centred[0].norm() * centred[1].norm())
    return float((centred[0] @ centred[1]) / denominator) if denominator > 0 else float("nan")


def _checked(importance: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(importance, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(importance).__name__}")
    if importance.numel() == 0:
        raise ValueError(f"{what} is empty")
    if not torch.isfinite(importance).all():
        raise ValueError(f"{what} holds NaN or inf")
    if (importance < 0).any():
        raise ValueError(f"{what} has negative entries; importance must be ≥ 0")
    if not (importance > 0).any():
        raise ValueError(f"{what} is all zero; φ and shares are undefined")
    return importance
