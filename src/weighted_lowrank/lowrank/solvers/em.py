"""EM for weighted low-rank approximation (Srebro & Jaakkola 2003).

With the importance scaled into [0, 1] by its maximum, ``X ← P_r(Ĩ ∘ W + (1 − Ĩ) ∘ X)`` where
``P_r`` is the rank-r truncated SVD. Each step minimises a majoriser of the weighted loss that
touches it at the current X, so the loss never increases; it is slow when the importance is
peaked, because most entries then get a tiny ``Ĩ`` and move little per step.
"""

from __future__ import annotations

from typing import Any

import torch

from weighted_lowrank.lowrank.solvers._common import (
    ITERATIVE_OPTIONS,
    Problem,
    SolverOutput,
    balanced_truncated_svd,
    initial_factors,
    run_iterations,
)

EM_OPTIONS: dict[str, Any] = dict(ITERATIVE_OPTIONS)


def solve_em(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Srebro–Jaakkola EM from the closed-form initialisation."""
    left, right = initial_factors(problem, options["init"], options["seed"])
    maximum = problem.importance.amax(dim=(1, 2), keepdim=True)
    scaled = problem.importance / torch.where(maximum > 0, maximum, torch.ones_like(maximum))
    rank = problem.rank

    def step(state):
        weight, importance = state["weight"], state["importance"]
        product = state["left"] @ state["right"]
        difference = weight - product
        loss = (importance * difference * difference).sum(dim=(1, 2), dtype=torch.float64)
        filled = product + state["scaled"] * difference
        left, right = balanced_truncated_svd(filled, rank)
        return {**state, "left": left, "right": right}, loss

    state = {"left": left, "right": right, "scaled": scaled}
    return run_iterations(problem, state, step, options, started)
