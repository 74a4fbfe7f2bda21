"""Closed-form solvers: plain truncated SVD and the Fisher-weighted SVD (one- or two-sided)."""

from __future__ import annotations

import time
from typing import Any

from weighted_lowrank.lowrank.solvers._common import (
    COMMON_OPTIONS,
    Problem,
    SolverOutput,
    balanced_truncated_svd,
    batched_loss,
    fwsvd_factors,
)

SVD_OPTIONS: dict[str, Any] = dict(COMMON_OPTIONS)
FWSVD_OPTIONS: dict[str, Any] = {**COMMON_OPTIONS, "axis": "both"}


def _outputs(
    problem: Problem, left, right, started: float, info: dict[str, Any]
) -> list[SolverOutput]:
    losses = batched_loss(problem.weight, problem.importance, left @ right).cpu()
    now = time.perf_counter() - started
    return [
        SolverOutput(
            left=left[k],
            right=right[k],
            history=[(now, float(losses[k]))],
            iterations=0,
            stop_reason="exact",
            info=dict(info),
        )
        for k in range(problem.batch)
    ]


def solve_svd(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Truncated SVD: the optimum of the unweighted problem (Eckart–Young)."""
    left, right = balanced_truncated_svd(problem.weight, problem.rank)
    return _outputs(problem, left, right, started, {})


def solve_fwsvd(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Fisher-weighted SVD along ``axis`` ("in", "out" or two-sided "both"), closed form."""
    axis = options["axis"]
    left, right = fwsvd_factors(problem.weight, problem.importance, problem.rank, axis)
    return _outputs(problem, left, right, started, {"axis": axis})
