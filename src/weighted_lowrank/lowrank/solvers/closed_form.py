"""Closed-form solvers: plain truncated SVD and the Fisher-weighted SVD (one- or two-sided)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from weighted_lowrank.lowrank.solvers._common import (
    FWSVD_AXES,
    Options,
    Problem,
    SolverOutput,
    SolverSpec,
    balanced_truncated_svd,
    batched_loss,
    fwsvd_factors,
    one_of,
    option,
)
from weighted_lowrank.lowrank.solvers.spectra import fwsvd_spectrum, svd_spectrum


@dataclass(frozen=True)
class FwsvdOptions(Options):
    axis: str = option("both", one_of(*FWSVD_AXES))


def exact_outputs(
    problem: Problem,
    left: torch.Tensor,
    right: torch.Tensor,
    started: float,
    info: dict[str, Any] | None = None,
) -> list[SolverOutput]:
    """One exact output per layer of a closed form (stop reason ``"exact"``, no iterations)."""
    losses = batched_loss(problem.weight, problem.importance, left @ right).cpu()
    now = time.perf_counter() - started
    return [
        SolverOutput(
            left=left[k],
            right=right[k],
            history=[(now, float(losses[k]))],
            iterations=0,
            stop_reason="exact",
            info=dict(info or {}),
        )
        for k in range(problem.batch)
    ]


def solve_svd(problem: Problem, options: Options, started: float) -> list[SolverOutput]:
    """Truncated SVD: the optimum of the unweighted problem (Eckart–Young)."""
    left, right = balanced_truncated_svd(problem.weight, problem.rank)
    return exact_outputs(problem, left, right, started)


def solve_fwsvd(problem: Problem, options: FwsvdOptions, started: float) -> list[SolverOutput]:
    """Fisher-weighted SVD along ``axis`` ("in", "out" or two-sided "both"), closed form."""
    left, right = fwsvd_factors(problem.weight, problem.importance, problem.rank, options.axis)
    return exact_outputs(problem, left, right, started, {"axis": options.axis})


SPECS = {
    "svd": SolverSpec(solve_svd, Options, svd_spectrum, "svd"),
    "fwsvd": SolverSpec(solve_fwsvd, FwsvdOptions, fwsvd_spectrum, "fwsvd"),
}
