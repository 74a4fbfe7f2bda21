"""The element-wise weighted low-rank objective shared by every solver.

For a Linear weight ``W`` (out × in), an importance ``I >= 0`` of the same shape and a rank ``r``,
every solver minimises ``L(A, B) = Σ_ij I_ij (W − A B)²_ij`` over ``A`` (out × r) and ``B`` (r × in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

#: Why a solver stopped, per layer: "converged" (the best loss improved by less than ``tol`` over
#: the solver's window, or reached 0), a cap hit first, or "exact" (a closed form).
StopReason = Literal["converged", "max_iters", "max_seconds", "exact"]
STOP_REASONS: tuple[StopReason, ...] = ("converged", "max_iters", "max_seconds", "exact")


@dataclass
class FactorizationResult:
    """Factors of one weight, ``left @ right ≈ weight``, their float64 weighted ``loss``, and how
    the solver got there (``history``: ``(seconds, loss)`` from the initial point on)."""

    left: torch.Tensor
    right: torch.Tensor
    loss: float
    history: list[tuple[float, float]]
    solver: str
    rank: int
    iterations: int
    seconds: float
    initial_loss: float
    stop_reason: StopReason
    info: dict[str, Any] = field(default_factory=dict)


def weighted_loss(
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    left: torch.Tensor,
    right: torch.Tensor,
) -> float:
    """``Σ I (W − left @ right)²`` in float64; ``importance=None`` means uniform importance 1."""
    if (
        weight.ndim != 2
        or left.ndim != 2
        or right.ndim != 2
        or left.shape[0] != weight.shape[0]
        or right.shape[1] != weight.shape[1]
        or left.shape[1] != right.shape[0]
    ):
        raise ValueError(
            f"left {tuple(left.shape)} @ right {tuple(right.shape)} does not give the weight's "
            f"shape {tuple(weight.shape)}; expected 2-D (out, r) and (r, in) factors"
        )
    if importance is not None and importance.shape != weight.shape:
        raise ValueError(
            f"importance shape {tuple(importance.shape)} differs from weight shape {tuple(weight.shape)}"
        )
    device = weight.device
    with torch.no_grad():
        residual = weight.to(torch.float64) - left.to(device, torch.float64) @ right.to(
            device, torch.float64
        )
        squared = residual.square()
        if importance is not None:
            squared = squared * importance.to(device, torch.float64)
    return float(squared.sum())


def relative_loss(loss: float, reference: float) -> float:
    """``loss / reference``; 1 when both are 0, ``inf`` when only the reference is 0."""
    if reference > 0:
        return loss / reference
    return 1.0 if loss <= 0 else math.inf


def rank_for_budget(shape: tuple[int, int], fraction: float) -> int:
    """Rank keeping ``fraction`` of a dense layer's weight parameters: ⌊f·out·in/(out+in)⌋."""
    if not (isinstance(fraction, int | float) and math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"budget fraction must be a number in (0, 1], got {fraction!r}")
    out_features, in_features = (int(size) for size in shape)
    exact = fraction * out_features * in_features / (out_features + in_features)
    # A tiny slack so that budgets hitting an integer exactly are not floored one below it.
    rank = math.floor(exact + 1e-9)
    if rank < 1:
        raise ValueError(
            f"budget fraction {fraction} leaves rank {exact:.3g} < 1 for a {out_features}×{in_features} layer"
        )
    return rank


def validate_problem(weight: torch.Tensor, importance: torch.Tensor | None, rank: int) -> None:
    """Raise ``ValueError`` unless (weight, importance, rank) is a well-formed problem."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(
            "weight must be a 2-D (out, in) floating-point tensor, got shape "
            f"{tuple(weight.shape)} and dtype {weight.dtype}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or inf")
    if importance is not None:
        if importance.shape != weight.shape:
            raise ValueError(
                f"importance shape {tuple(importance.shape)} differs from weight shape "
                f"{tuple(weight.shape)}"
            )
        if not bool(torch.isfinite(importance).all()):
            raise ValueError("importance contains NaN or inf; expected finite values >= 0")
        if bool((importance < 0).any()):
            raise ValueError(
                f"importance has negative entries (min {float(importance.min()):.3g}); expected >= 0"
            )
    smallest = min(weight.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < smallest:
        raise ValueError(
            f"rank must be an int with 1 <= rank < min(out, in) = {smallest} for weight shape "
            f"{tuple(weight.shape)}, got {rank!r}"
        )
