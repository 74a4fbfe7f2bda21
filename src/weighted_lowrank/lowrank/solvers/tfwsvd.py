"""TFWSVD, the default element-wise solver: preconditioned nonlinear conjugate gradients on (A, B).

* **Start** from the two-sided closed form (``init="fwsvd"``), on the default model's Fisher 1–46 %
  (median ≈ 5 %) above the optimum at budget 0.5 (docs/METHOD.md).
* **Preconditioner** from the same separable approximation ``I ≈ u vᵀ`` (row sums × column
  sums / total): the Hessian block of row ``a_i`` is ``2 B diag(I_i) Bᵀ ≈ 2 u_i B D_v Bᵀ`` and
  that of column ``b_j`` is ``≈ 2 v_j Aᵀ D_u A``. Applying their inverses costs two r × r
  Cholesky factorisations per layer — no per-row r × r systems as in ALS — and for a separable
  importance it turns each half of the gradient into the exact ALS step, so the method inherits
  ALS's scale invariance while moving A and B *jointly* (ALS's slow "swamps" come from moving
  them one at a time).
* **Direction**: Polak–Ribière+ conjugation of the preconditioned gradients, restarted every
  ``restart`` iterations.
* **Exact line search**: along ``(dA, dB)`` the loss is a quartic polynomial in the step ``t``
  (``W − (A + t dA)(B + t dB) = R − t P − t² Q``); its five coefficients cost three matmuls
  and the global minimiser is a root of a cubic. So every iteration decreases the loss, with no
  step size to tune.

One iteration costs five (out × r × in) matmuls, all batched over the layers of a group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from weighted_lowrank.lowrank.solvers._common import (
    ITERATIVE_OPTIONS,
    Batched,
    IterateState,
    Problem,
    SolverOutput,
    initial_factors,
    positive_weights,
    run_iterations,
)

# tol 3e-5 over 3 iterations: 13–88 iterations per layer on the default model at budget 0.5, summed
# loss 0.023 % above a 400-iteration run; max_iters is a safety net (docs/METHOD.md, "Stopping").
TFWSVD_OPTIONS: dict[str, Any] = {
    **ITERATIVE_OPTIONS,
    "max_iters": 150,
    "tol": 3e-5,
    "restart": 50,
    "refresh_every": 10,
    "precondition_every": 10,
}
#: Iterations over which ``tol`` is measured.
TFWSVD_WINDOW = 3


def separable_weights(importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column factors of ``I ≈ u vᵀ`` (marginal product), made strictly positive."""
    rows = importance.sum(dim=2)
    cols = importance.sum(dim=1) / importance.sum(dim=(1, 2)).clamp_min(1e-30)[:, None]
    return positive_weights(rows), positive_weights(cols)


def _inverse_gram(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of each PSD r × r matrix with a small relative ridge (Cholesky in float64).

    Only a preconditioner: any SPD approximation keeps the method convergent, so the ridge just
    keeps it finite when a factor is rank-deficient. ``M⁻¹ = L⁻ᵀ L⁻¹`` from one triangular
    solve (much faster on CPU than ``cholesky_inverse`` for batches of small matrices).
    """
    matrix64 = matrix.double()
    rank = matrix.shape[-1]
    diagonal = matrix64.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    identity = torch.eye(rank, dtype=torch.float64, device=matrix.device)
    ridge = 1e-7
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(
            matrix64 + (ridge * diagonal)[:, None, None] * identity
        )
        if not bool((info > 0).any()):
            break
        ridge *= 100
    inverse_factor = torch.linalg.solve_triangular(
        factor, identity.expand_as(factor), upper=False
    ).to(matrix.dtype)
    return inverse_factor.transpose(1, 2) @ inverse_factor


def inverse_grams(
    left: torch.Tensor, right: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((Aᵀ D_u A)⁻¹, (B D_v Bᵀ)⁻¹)``: the separable Hessian blocks of B's columns and A's rows."""
    left_inverse = _inverse_gram(left.transpose(1, 2) @ (left * rows[:, :, None]))
    right_inverse = _inverse_gram((right * cols[:, None, :]) @ right.transpose(1, 2))
    return left_inverse, right_inverse


@dataclass(frozen=True, kw_only=True, eq=False)
class Preconditioner(Batched):
    """The separable importance ``I ≈ u vᵀ`` (``rows`` = u, ``cols`` = v) and the inverse Grams
    ``(Aᵀ D_u A)⁻¹``, ``(B D_v Bᵀ)⁻¹`` at the factors they were last refreshed at."""

    rows: torch.Tensor
    cols: torch.Tensor
    left_inverse: torch.Tensor
    right_inverse: torch.Tensor

    def refreshed(self, left: torch.Tensor, right: torch.Tensor) -> Preconditioner:
        left_inverse, right_inverse = inverse_grams(left, right, self.rows, self.cols)
        return replace(self, left_inverse=left_inverse, right_inverse=right_inverse)

    def apply(
        self, grad_left: torch.Tensor, grad_right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_u⁻¹ ∇_A (B D_v Bᵀ)⁻¹, (Aᵀ D_u A)⁻¹ ∇_B D_v⁻¹)``."""
        direction_left = (grad_left / self.rows[:, :, None]) @ self.right_inverse
        direction_right = self.left_inverse @ (grad_right / self.cols[:, None, :])
        return direction_left, direction_right


@dataclass(frozen=True, kw_only=True, eq=False)
class Gradient(Batched):
    """Residual ``AB − W``, weighted residual ``I ∘ (AB − W)``, gradients, preconditioned
    gradients, and ``gᵀz`` (the Polak–Ribière denominator of the next iteration)."""

    residual: torch.Tensor
    weighted: torch.Tensor
    grad_left: torch.Tensor
    grad_right: torch.Tensor
    pre_left: torch.Tensor
    pre_right: torch.Tensor
    grad_dot_pre: torch.Tensor

    @classmethod
    def at(
        cls,
        importance: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        residual: torch.Tensor,
        preconditioner: Preconditioner,
    ) -> Gradient:
        weighted = importance * residual
        grad_left = 2 * weighted @ right.transpose(1, 2)
        grad_right = 2 * left.transpose(1, 2) @ weighted
        pre_left, pre_right = preconditioner.apply(grad_left, grad_right)
        return cls(
            residual=residual,
            weighted=weighted,
            grad_left=grad_left,
            grad_right=grad_right,
            pre_left=pre_left,
            pre_right=pre_right,
            grad_dot_pre=_dot(grad_left, pre_left) + _dot(grad_right, pre_right),
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class TfwsvdState(IterateState):
    """The CG iterate: preconditioner, gradient at (A, B), and the search direction."""

    preconditioner: Preconditioner
    gradient: Gradient
    dir_left: torch.Tensor
    dir_right: torch.Tensor


def quartic_minimiser(coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global minimiser ``t`` and minimum of ``Σ_k c_k t^k`` (k = 0..4) for each row (float64).

    The candidates are the real roots of the derivative (a cubic, via its companion matrix) and
    ``t = 0``; when the quartic term vanishes the cubic degenerates and the companion matrix is
    built from the highest non-zero term.
    """
    c = coefficients.double().cpu()
    derivative = torch.stack([c[:, 1], 2 * c[:, 2], 3 * c[:, 3], 4 * c[:, 4]], dim=1)
    batch = c.shape[0]
    candidates = [torch.zeros(batch, dtype=torch.float64)]
    scale = derivative.abs().amax(dim=1).clamp_min(1e-300)
    lead = derivative[:, 3]
    cubic = lead.abs() > 1e-12 * scale
    companion = torch.zeros(batch, 3, 3, dtype=torch.float64)
    safe_lead = torch.where(cubic, lead, torch.ones_like(lead))
    companion[:, 0, :] = -derivative[:, [2, 1, 0]] / safe_lead[:, None]
    companion[:, 1, 0] = 1
    companion[:, 2, 1] = 1
    roots = torch.linalg.eigvals(companion)
    real = roots.imag.abs() <= 1e-7 * roots.abs().clamp_min(1.0)
    for k in range(3):
        usable = cubic & real[:, k]
        candidates.append(torch.where(usable, roots[:, k].real, 0.0))
    # Quadratic fallback (no quartic/cubic term): the vertex when it is a minimum.
    curvature = derivative[:, 1]
    vertex = torch.where(curvature > 0, -derivative[:, 0] / curvature.clamp_min(1e-300), 0.0)
    candidates.append(torch.where(cubic, 0.0, vertex))
    steps = torch.stack(candidates, dim=1)
    powers = torch.stack([steps**k for k in range(5)], dim=2)
    values = (powers * c[:, None, :]).sum(dim=2)
    best = values.argmin(dim=1)
    index = torch.arange(batch)
    return steps[index, best], values[index, best]


def solve_tfwsvd(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Preconditioned nonlinear CG with exact quartic line search (see the module docstring)."""
    weight, importance = problem.weight, problem.importance
    left, right = initial_factors(problem, options["init"], options["seed"])
    rows, cols = separable_weights(importance)
    left_inverse, right_inverse = inverse_grams(left, right, rows, cols)
    preconditioner = Preconditioner(
        rows=rows, cols=cols, left_inverse=left_inverse, right_inverse=right_inverse
    )
    gradient = Gradient.at(importance, left, right, left @ right - weight, preconditioner)
    state = TfwsvdState(
        weight=weight,
        importance=importance,
        left=left,
        right=right,
        preconditioner=preconditioner,
        gradient=gradient,
        dir_left=-gradient.pre_left,
        dir_right=-gradient.pre_right,
    )
    return run_iterations(
        state, lambda state: _cg_step(state, options), options, started, window=TFWSVD_WINDOW
    )


def _cg_step(state: TfwsvdState, options: dict[str, Any]) -> tuple[TfwsvdState, torch.Tensor]:
    """One CG iteration: exact line search along the direction, then the next direction."""
    iteration = state.iteration
    t, linear, quadratic, coefficients = _line_search(state)
    left = state.left + t * state.dir_left
    right = state.right + t * state.dir_right
    if iteration % options["refresh_every"] == 0:
        # The running residual drifts in float32; recompute it now and then.
        residual = left @ right - state.weight
    else:
        residual = state.gradient.residual.addcmul(t, linear).addcmul_(t * t, quadratic)
    preconditioner = state.preconditioner
    if iteration % options["precondition_every"] == 0:
        # The r × r Grams drift slowly; a preconditioner held fixed for a few iterations
        # is as good and saves most of the small-matrix LAPACK time.
        preconditioner = preconditioner.refreshed(left, right)
    previous = state.gradient
    gradient = Gradient.at(state.importance, left, right, residual, preconditioner)
    # Polak–Ribière+: β = g_newᵀ(z_new − z_old) / g_oldᵀ z_old, clipped at 0.
    cross = _dot(gradient.grad_left, previous.pre_left) + _dot(
        gradient.grad_right, previous.pre_right
    )
    beta = ((gradient.grad_dot_pre - cross) / previous.grad_dot_pre.clamp_min(1e-300)).clamp_min(0)
    if iteration % options["restart"] == 0:
        beta = torch.zeros_like(beta)
    beta = beta.to(left.dtype)[:, None, None]
    new_state = replace(
        state,
        left=left,
        right=right,
        preconditioner=preconditioner,
        gradient=gradient,
        dir_left=beta * state.dir_left - gradient.pre_left,
        dir_right=beta * state.dir_right - gradient.pre_right,
    )
    return new_state, coefficients[:, 0]


def _line_search(
    state: TfwsvdState,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact minimiser ``t`` (shaped to broadcast over the factors) along ``(dA, dB)``.

    Also returns the linear and quadratic terms ``P``, ``Q`` of the residual along the line
    (``R(t) = R + t P + t² Q``) and the quartic's coefficients, whose constant term is the loss
    at the current point.
    """
    importance, left, right = state.importance, state.left, state.right
    residual, weighted = state.gradient.residual, state.gradient.weighted
    dir_left, dir_right = state.dir_left, state.dir_right
    linear = torch.baddbmm(dir_left @ right, left, dir_right)
    quadratic = dir_left @ dir_right
    weighted_linear = importance * linear
    coefficients = torch.stack(
        [
            _dot(weighted, residual),
            2 * _dot(weighted, linear),
            _dot(weighted_linear, linear) + 2 * _dot(weighted, quadratic),
            2 * _dot(weighted_linear, quadratic),
            _dot(importance * quadratic, quadratic),
        ],
        dim=1,
    )
    step_size, _ = quartic_minimiser(coefficients)
    t = step_size.to(left.device, left.dtype)[:, None, None]
    return t, linear, quadratic, coefficients


def _dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-layer Frobenius inner product: float32 row sums, float64 total (fast and accurate)."""
    return (first * second).sum(dim=2).sum(dim=1, dtype=torch.float64)
