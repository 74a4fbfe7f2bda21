"""Cheap per-layer statistics of an importance matrix that predict where plain SVD will hurt.

φ(W) (``fisher_variance``) is the population variance of the importance normalised by its mean,

    φ(W) = (1/|W|) Σ_ij (I_ij / Ī − 1)²,   Ī = (1/|W|) Σ_ij I_ij,

i.e. the squared coefficient of variation of I. It is invariant to the scale of I (the number of
examples, the loss scale), zero exactly when I is uniform (the case where SVD is already optimal
for the weighted objective), and grows as importance concentrates on few entries.

Any statistic in :data:`RISK_STATISTICS` can drive the high/low ``risk`` column; φ is the default.
``svd_taylor_loss`` = ½ Σ_ij I_ij (W − SVD_r(W))²_ij / N is the second-order Taylor estimate of
the mean-loss increase that replacing W by its rank-r SVD causes (I summed over N examples, so
I/N is the empirical Fisher, the usual stand-in for the Hessian's diagonal); unlike φ it is in
units of the task loss and grows with how much the layer matters as a whole. Whether any of them
predicts the validation damage SVD actually causes is measured by the ``risk_validation``
pipeline (docs/METHOD.md); on the default fine-tuned MiniLM none does significantly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from scipy import stats

from weighted_lowrank.lowrank.objective import rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.solvers import factorize_batch
from weighted_lowrank.lowrank.targets import describe_module

#: A layer is "high" risk when φ(W) ≥ this. Chosen on a fine-tuned MiniLM's Fisher (docs/METHOD.md):
#: of the thresholds tried it best separated layers where SVD's weighted loss is at least twice
#: two-sided FWSVD's; φ is only a moderate predictor (value projections are counterexamples).
DEFAULT_PHI_THRESHOLD = 50.0

#: Per-layer statistics of :func:`layer_statistics` that may drive the ``risk`` column (larger
#: means riskier for every one of them).
RISK_STATISTICS = (
    "phi",
    "top_share",
    "max_to_mean",
    "svd_error_alignment",
    "svd_loss_rel_fwsvd",
    "svd_taylor_loss",
    "fwsvd_taylor_gain",
)
#: The statistics that need the per-layer SVD and FWSVD (``compare_solvers``).
SOLVER_STATISTICS = (
    "svd_error_alignment",
    "svd_loss_rel_fwsvd",
    "svd_taylor_loss",
    "fwsvd_taylor_gain",
)
#: The statistics that also need the number of examples the Fisher sums over.
TAYLOR_STATISTICS = ("svd_taylor_loss", "fwsvd_taylor_gain")


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


def risk_level(value: float, threshold: float = DEFAULT_PHI_THRESHOLD) -> str:
    """``"high"`` when ``value ≥ threshold`` else ``"low"`` (NaN is ``"low"``)."""
    return "high" if value >= threshold else "low"


def check_risk_statistic(
    statistic: str, compare_solvers: bool = True, num_examples: int | None = 1
) -> str:
    """Return ``statistic`` if it is in :data:`RISK_STATISTICS` and computable, else raise.

    Statistics in :data:`SOLVER_STATISTICS` need ``compare_solvers``; the Taylor ones also need
    the number of examples the Fisher sums over.
    """
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
) -> list[dict]:
    """One row of risk statistics per Fisher key (``"<module>.weight"``), in the Fisher's order.

    Columns: ``module``, ``layer``, ``kind``, ``out_features``, ``in_features``, ``rank`` (from
    ``budget``), ``phi`` (φ(W)), ``top_share`` (share of importance in the top ``top_fraction`` of
    entries), ``max_to_mean`` and, with ``compare_solvers``: ``svd_error_alignment`` =
    Σ I R² / (Ī Σ R²) for SVD's residual R (1 when SVD's error falls on average-importance
    entries, > 1 when it hits important ones) and ``svd_loss_rel_fwsvd`` = SVD's weighted loss /
    two-sided FWSVD's at the same rank (≥ 1 means weighting pays); with ``compare_solvers`` and
    ``num_examples`` (the N the Fisher sums over) also ``svd_taylor_loss`` = ½ Σ I R² / N (the
    second-order estimate of the mean-loss increase from SVD) and ``fwsvd_taylor_gain`` = ½ (SVD's
    − FWSVD's weighted loss) / N (the same estimate of what weighting saves). Last, ``risk``:
    ``"high"`` when the row's ``statistic`` ≥ ``threshold``. ``weights`` maps the same keys to the
    weight matrices.
    """
    if not fisher:
        raise ValueError("fisher is empty; expected one importance tensor per weight")
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1), got {budget}")
    if num_examples is not None and (
        isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1
    ):
        raise ValueError(f"num_examples must be a positive int or None, got {num_examples!r}")
    check_risk_statistic(statistic, compare_solvers, num_examples)
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
            # SVD's error under uniform importance of the same total: the unweighted loss × mean I.
            uniform = float(importance.double().mean()) * weighted_loss(
                matrix, None, svd_result.left, svd_result.right
            )
            row["svd_error_alignment"] = svd_result.loss / uniform if uniform > 0 else 1.0
            row["svd_loss_rel_fwsvd"] = (
                svd_result.loss / fwsvd_result.loss if fwsvd_result.loss > 0 else 1.0
            )
            if num_examples is not None:
                row["svd_taylor_loss"] = 0.5 * svd_result.loss / num_examples
                row["fwsvd_taylor_gain"] = (
                    0.5 * (svd_result.loss - fwsvd_result.loss) / num_examples
                )
    for row in rows:
        row["risk"] = risk_level(row[statistic], threshold)
    return rows


def risk_summary(
    rows: list[dict], statistic: str = "phi", threshold: float = DEFAULT_PHI_THRESHOLD
) -> dict:
    """Per-model aggregates of :func:`layer_statistics` rows (JSON-friendly).

    ``statistic`` and ``threshold`` are the rule the rows' ``risk`` column was assigned with.
    """
    if not rows:
        raise ValueError("no layer rows to summarise")
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
    return summary


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman rank correlation as ``scipy.stats.spearmanr`` computes it (tied values share their
    average rank); NaN for fewer than two pairs or a constant sequence."""
    if len(first) != len(second):
        raise ValueError(
            f"spearman needs sequences of equal length, got {len(first)} and {len(second)}"
        )
    if len(first) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(first, second).statistic)


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
