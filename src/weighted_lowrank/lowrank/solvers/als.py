"""Alternating weighted least squares with proximal damping, all r × r solves batched.

Half-step for A (B fixed): each row ``a_i`` minimises
``Σ_j I_ij (W_ij − a_i·b_j)² + δ_i ‖a_i − a_i^old‖²``, i.e. solves
``(B diag(I_i) Bᵀ + δ_i Id) a_i = B (I_i ∘ W_i) + δ_i a_i^old``; the B half-step is the same on
columns. The proximal term is the damping: it keeps rows/columns whose importance is zero (or
too small to pin all r coordinates) well-posed — they simply stay where they are — and, because
each half-step minimises "loss + damping" exactly from the old point, the loss never increases.
"""

from __future__ import annotations

from typing import Any

import torch

from weighted_lowrank.lowrank.solvers._common import (
    ITERATIVE_OPTIONS,
    Problem,
    SolverOutput,
    initial_factors,
    run_iterations,
)

ALS_OPTIONS: dict[str, Any] = {**ITERATIVE_OPTIONS, "damping": 1e-6, "chunk_elements": 2**25}


def row_grams(importance: torch.Tensor, basis: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """``G[b, i] = Σ_j importance[b, i, j] · basis[b, :, j] basis[b, :, j]ᵀ`` as (b, rows, r, r).

    One matmul per chunk against the upper-triangle products of the basis columns (half the
    work of the full r × r outer products), mirrored afterwards.
    """
    batch, rows, _ = importance.shape
    rank = basis.shape[1]
    upper_rows, upper_cols = torch.triu_indices(rank, rank, device=basis.device)
    grams = torch.empty(batch, rows, rank, rank, dtype=basis.dtype, device=basis.device)
    pairs = len(upper_rows)
    row_chunk = max(1, chunk_elements // max(pairs, 1))
    for b in range(batch):
        products = (basis[b, upper_rows, :] * basis[b, upper_cols, :]).transpose(0, 1)
        for start in range(0, rows, row_chunk):
            stop = min(rows, start + row_chunk)
            upper = importance[b, start:stop] @ products
            block = grams[b, start:stop]
            block[:, upper_rows, upper_cols] = upper
            block[:, upper_cols, upper_rows] = upper
    return grams


def damped_solve(
    grams: torch.Tensor, rhs: torch.Tensor, previous: torch.Tensor, damping: float
) -> torch.Tensor:
    """Solve ``(G + δ Id) x = rhs + δ x_prev`` for every row at once, in float64.

    ``δ_i = damping · (tr G_i / r + mean_k tr G_k / r)``: relative to the row's own curvature,
    with a floor from the layer's average so all-zero rows get a positive δ too. A Cholesky
    failure (float32 Grams can be slightly indefinite) retries that row with 100× the damping.
    """
    rank = grams.shape[-1]
    grams64 = grams.double()
    diagonal = grams64.diagonal(dim1=-2, dim2=-1).sum(-1) / rank
    floor = diagonal.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    delta = damping * (diagonal + floor)
    identity = torch.eye(rank, dtype=torch.float64, device=grams.device)
    rhs64 = rhs.double()
    previous64 = previous.double()
    for _ in range(8):
        system = grams64 + delta[..., None, None] * identity
        factor, info = torch.linalg.cholesky_ex(system)
        failed = info > 0
        if not bool(failed.any()):
            break
        delta = torch.where(failed, delta * 100, delta)
    solution = torch.cholesky_solve((rhs64 + delta[..., None] * previous64)[..., None], factor)
    return solution[..., 0].to(grams.dtype)


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
    left_grams = row_grams(importance, right, chunk_elements)
    left = damped_solve(left_grams, weighted @ right.transpose(1, 2), left, damping)
    right_grams = row_grams(importance.transpose(1, 2), left.transpose(1, 2), chunk_elements)
    right_t = damped_solve(
        right_grams, weighted.transpose(1, 2) @ left, right.transpose(1, 2), damping
    )
    return left, right_t.transpose(1, 2).contiguous()


def solve_als(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Damped alternating least squares from the closed-form initialisation."""
    damping = options["damping"]
    if not (isinstance(damping, int | float) and damping > 0):
        raise ValueError(f"solver 'als': damping must be a number > 0, got {damping!r}")
    left, right = initial_factors(problem, options["init"], options["seed"])
    chunk = int(options["chunk_elements"])

    def step(state):
        weight, importance = state["weight"], state["importance"]
        difference = weight - state["left"] @ state["right"]
        loss = (importance * difference * difference).sum(dim=(1, 2), dtype=torch.float64)
        left, right = als_sweep(weight, importance, state["left"], state["right"], damping, chunk)
        return {**state, "left": left, "right": right}, loss

    return run_iterations(problem, {"left": left, "right": right}, step, options, started)
