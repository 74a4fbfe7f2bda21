"""Alternating weighted least squares with proximal damping, all r × r solves batched.

Each row ``a_i`` minimises ``Σ_j I_ij (W_ij − a_i·b_j)² + δ_i ‖a_i − a_i^old‖²`` (columns of B
likewise): rows without importance stay put, and the loss never increases (docs/METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from weighted_lowrank.lowrank.solvers._common import (
    NON_NEGATIVE,
    POSITIVE,
    IterateState,
    IterativeOptions,
    Problem,
    SolverOutput,
    SolverSpec,
    batched_loss,
    initial_factors,
    int_at_least,
    option,
    run_iterations,
)
from weighted_lowrank.lowrank.solvers.spectra import PROXY_CURVE, proxy_spectrum


# One sweep (≈ 27 s for MiniLM at budget 0.5) is what fits the default run's time; ALS needs ≈ 12
# to flatten (docs/METHOD.md "Stopping"); tol stops it near its plateau when max_iters is raised.
@dataclass(frozen=True)
class AlsOptions(IterativeOptions):
    max_iters: int = option(1, int_at_least(0))
    tol: float = option(1e-4, NON_NEGATIVE)
    damping: float = option(1e-6, POSITIVE)
    chunk_elements: int = option(2**25, int_at_least(1))


@dataclass(frozen=True, kw_only=True, eq=False)
class AlsState(IterateState):
    """ALS needs nothing beyond the current factors: each sweep solves from them afresh."""


def solve_rows(
    importance: torch.Tensor,
    basis: torch.Tensor,
    rhs: torch.Tensor,
    previous: torch.Tensor,
    damping: float,
    chunk_elements: int,
) -> torch.Tensor:
    """Damped weighted least squares for every row of every layer in the batch, in float64.

    Row ``i`` solves ``(G_i + δ_i Id) x_i = rhs_i + δ_i x_i^prev``, ``G_i = Σ_j I_ij b_j b_jᵀ``,
    ``δ_i = damping · (tr G_i / r + mean_k tr G_k / r)``, 100× the damping where a Cholesky fails
    (docs/METHOD.md, "als"). Grams are built a chunk of rows at a time from the upper-triangle
    products of the basis, about ``chunk_elements`` entries at once: every row's Gram of a batch
    of FFN weights took 8.5 GB.
    """
    batch, rows, _ = importance.shape
    rank = basis.shape[1]
    upper_rows, upper_cols = torch.triu_indices(rank, rank, device=basis.device)
    # tr G_i = Σ_j I_ij ‖b_j‖², without forming G_i.
    traces = (importance @ (basis * basis).sum(dim=1, dtype=basis.dtype)[..., None])[
        ..., 0
    ].double()
    diagonal = traces / rank
    floor = diagonal.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    deltas = damping * (diagonal + floor)
    identity = torch.eye(rank, dtype=torch.float64, device=basis.device)
    row_chunk = max(1, chunk_elements // (4 * rank * rank))
    solution = torch.empty(batch, rows, rank, dtype=basis.dtype, device=basis.device)
    for b in range(batch):
        products = (basis[b, upper_rows, :] * basis[b, upper_cols, :]).transpose(0, 1)
        for start in range(0, rows, row_chunk):
            stop = min(rows, start + row_chunk)
            upper = (importance[b, start:stop] @ products).double()
            grams = torch.empty(stop - start, rank, rank, dtype=torch.float64, device=basis.device)
            grams[:, upper_rows, upper_cols] = upper
            grams[:, upper_cols, upper_rows] = upper
            delta = deltas[b, start:stop]
            for _ in range(8):
                factor, info = torch.linalg.cholesky_ex(grams + delta[:, None, None] * identity)
                failed = info > 0
                if not bool(failed.any()):
                    break
                delta = torch.where(failed, delta * 100, delta)
            right_side = (
                rhs[b, start:stop].double() + delta[:, None] * previous[b, start:stop].double()
            )
            solution[b, start:stop] = torch.cholesky_solve(right_side[..., None], factor)[
                ..., 0
            ].to(basis.dtype)
    return solution


def als_sweep(
    weight: torch.Tensor,
    importance: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    damping: float,
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One damped ALS sweep (A then B) for a batch; never increases the loss."""
    weighted = importance * weight
    left = solve_rows(
        importance, right, weighted @ right.transpose(1, 2), left, damping, chunk_elements
    )
    right_t = solve_rows(
        importance.transpose(1, 2),
        left.transpose(1, 2),
        weighted.transpose(1, 2) @ left,
        right.transpose(1, 2),
        damping,
        chunk_elements,
    )
    return left, right_t.transpose(1, 2).contiguous()


def solve_als(problem: Problem, options: AlsOptions, started: float) -> list[SolverOutput]:
    """Damped alternating least squares from the closed-form initialisation."""
    damping = options.damping
    left, right = initial_factors(problem, options.init, options.seed)
    chunk = int(options.chunk_elements)

    def step(state: AlsState) -> tuple[AlsState, torch.Tensor]:
        weight, importance = state.weight, state.importance
        loss = batched_loss(weight, importance, state.left @ state.right)
        left, right = als_sweep(weight, importance, state.left, state.right, damping, chunk)
        return replace(state, left=left, right=right), loss

    state = AlsState(weight=problem.weight, importance=problem.importance, left=left, right=right)
    return run_iterations(state, step, options, started)


SPEC = SolverSpec(solve_als, AlsOptions, proxy_spectrum, PROXY_CURVE, window=1)
