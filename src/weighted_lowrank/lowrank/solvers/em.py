"""EM for weighted low-rank approximation (Srebro & Jaakkola 2003).

``X ← P_r(Ĩ ∘ W + (1 − Ĩ) ∘ X)``, ``Ĩ = I / max I``, ``P_r`` the rank-r truncated SVD: a
majoriser step, so monotone, and slow when the importance is peaked (docs/METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from weighted_lowrank.lowrank.solvers._common import (
    IterateState,
    IterativeOptions,
    Problem,
    SolverOutput,
    SolverSpec,
    balanced_truncated_svd,
    initial_factors,
    int_at_least,
    option,
    run_iterations,
)
from weighted_lowrank.lowrank.solvers.spectra import PROXY_CURVE, proxy_spectrum


# EM gains ≈ 1e-4 of the loss per iteration and is still improving after 300 iterations (14 min)
# on the default model, so a per-iteration tol cannot detect its plateau: max_iters = 5 is the cap
# that fits the default run's time (stop_reason "max_iters", docs/METHOD.md "Stopping").
@dataclass(frozen=True)
class EmOptions(IterativeOptions):
    max_iters: int = option(5, int_at_least(0))


@dataclass(frozen=True, kw_only=True, eq=False)
class EmState(IterateState):
    """EM's iterate and the importance scaled into [0, 1] by each layer's maximum."""

    scaled: torch.Tensor


def solve_em(problem: Problem, options: EmOptions, started: float) -> list[SolverOutput]:
    """Srebro–Jaakkola EM from the closed-form initialisation."""
    left, right = initial_factors(problem, options.init, options.seed)
    maximum = problem.importance.amax(dim=(1, 2), keepdim=True)
    scaled = problem.importance / torch.where(maximum > 0, maximum, torch.ones_like(maximum))
    rank = problem.rank

    def step(state: EmState) -> tuple[EmState, torch.Tensor]:
        product = state.left @ state.right
        difference = state.weight - product
        loss = (state.importance * difference * difference).sum(dim=(1, 2), dtype=torch.float64)
        filled = product + state.scaled * difference
        left, right = balanced_truncated_svd(filled, rank)
        return replace(state, left=left, right=right), loss

    state = EmState(
        weight=problem.weight, importance=problem.importance, left=left, right=right, scaled=scaled
    )
    return run_iterations(state, step, options, started)


SPEC = SolverSpec(solve_em, EmOptions, proxy_spectrum, PROXY_CURVE, window=1)
