"""Closed forms that read calibration statistics: ``kfwsvd``, ``svd_llm`` and ``asvd``.

Each is the exact minimiser of its own quadratic in ΔW = W − left·right (:mod:`.whitening`),
reported in ``info`` in the statistics' units; ``loss`` stays the diagonal-importance loss.

- ``kfwsvd``: Kronecker-factored Fisher F ≈ G ⊗ A, ``tr(ΔWᵀ G ΔW A)`` (``kronecker_loss``).
- ``svd_llm``: SVD-LLM's activation whitening, ``‖ΔW L_A‖²`` (``activation_loss``); its code
  shifts a failed Cholesky by an absolute (1e-6 − λ_min)·I, here the damping is relative.
- ``asvd``: ASVD's scaling, ``‖ΔW diag(s)‖²`` (``scaled_loss``), as ASVD's code
  (``modules/svd_linear.py``, ``act_aware_utils.py``): s = (mean |x|)^alpha + 1e-6, SVD of
  ``W diag(s)``, ``right = √S V_rᵀ diag(s)⁻¹``. ASVD's mean |x| sums per-sequence token means
  (ours: the mean over real tokens), so its floor is made relative, ``s += 1e-6 · mean(s)``; and
  the truncation is exact where ASVD uses the randomized ``torch.svd_lowrank``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weighted_lowrank.lowrank.solvers._common import (
    KFWSVD_NEEDS,
    POSITIVE,
    Options,
    Problem,
    SolverOutput,
    SolverSpec,
    is_number,
    option,
)
from weighted_lowrank.lowrank.solvers.closed_form import exact_outputs
from weighted_lowrank.lowrank.solvers.spectra import Spectrum, whitened_spectrum
from weighted_lowrank.lowrank.solvers.whitening import (
    DEFAULT_DAMPING,
    Moment,
    Truncation,
    kronecker_truncation,
)

#: ASVD's floor on the channel scale, relative to its mean here (absolute 1e-6 in ASVD).
ASVD_FLOOR = 1e-6
#: Largest ``alpha`` of ``asvd``: the scale's dynamic range grows as (max/min |x|)^alpha, and
#: beyond ~2 it swamps a float64 factorization; ASVD itself uses 0.5 (and studies 0.1–1).
MAX_ALPHA = 2.0


@dataclass(frozen=True)
class DampedOptions(Options):
    """``kfwsvd`` and ``svd_llm``: the relative damping of each moment (``whitening``)."""

    damping: float = option(DEFAULT_DAMPING, POSITIVE)


@dataclass(frozen=True)
class AsvdOptions(Options):
    alpha: float = option(
        0.5,
        (
            lambda v: is_number(v) and 0 <= v <= MAX_ALPHA,
            f"a number in [0, {MAX_ALPHA:g}] (0: plain SVD; ASVD uses 0.5)",
        ),
    )


def kfwsvd_moments(problem: Problem, options: DampedOptions) -> tuple[Moment, Moment]:
    """(input side A, output side G), damped: F ≈ G ⊗ A."""
    return (
        Moment(problem.input_moment, options.damping, "input_moment"),
        Moment(problem.output_moment, options.damping, "output_moment"),
    )


def svd_llm_moments(problem: Problem, options: DampedOptions) -> tuple[Moment, Moment]:
    """(A damped, identity): activation whitening."""
    return Moment(problem.input_moment, options.damping, "input_moment"), Moment(None)


def asvd_moments(problem: Problem, options: AsvdOptions) -> tuple[Moment, Moment]:
    """(diag(s²), identity), s = (mean |x|)^alpha floored; a layer whose mean |x| is all 0 is
    plain SVD."""
    scale = problem.input_abs_mean.pow(float(options.alpha))
    scale = scale + ASVD_FLOOR * scale.mean(dim=1, keepdim=True)
    return Moment(scale.square(), 0.0, "input_abs_mean"), Moment(None)


def solve_kfwsvd(problem: Problem, options: DampedOptions, started: float) -> list[SolverOutput]:
    """Truncated SVD of ``L_Gᵀ W L_A`` mapped back: the optimum of ``tr(ΔWᵀ G ΔW A)``."""
    truncation = _truncation(problem, *kfwsvd_moments(problem, options))
    units = problem.statistic_scale["input_moment"] * problem.statistic_scale["output_moment"]
    return _outputs(
        problem,
        truncation,
        started,
        {
            "kronecker_loss": _original_units(problem, truncation, units),
            "damping_input": truncation.damping_input,
            "damping_output": truncation.damping_output,
            "input_identity_fallback": truncation.identity_input,
            "output_identity_fallback": truncation.identity_output,
        },
    )


def solve_svd_llm(problem: Problem, options: DampedOptions, started: float) -> list[SolverOutput]:
    """SVD-LLM: truncated SVD of ``W L_A`` mapped back, the optimum of ``‖ΔW L_A‖²``."""
    truncation = _truncation(problem, *svd_llm_moments(problem, options))
    units = problem.statistic_scale["input_moment"]
    return _outputs(
        problem,
        truncation,
        started,
        {
            "activation_loss": _original_units(problem, truncation, units),
            "damping_input": truncation.damping_input,
            "input_identity_fallback": truncation.identity_input,
        },
    )


def solve_asvd(problem: Problem, options: AsvdOptions, started: float) -> list[SolverOutput]:
    """ASVD: truncated SVD of ``W diag(s)``, s = (mean |x|)^alpha floored, mapped back."""
    alpha = float(options.alpha)
    truncation = _truncation(problem, *asvd_moments(problem, options))
    units = problem.statistic_scale["input_abs_mean"].pow(2 * alpha)
    return _outputs(
        problem,
        truncation,
        started,
        {
            "scaled_loss": _original_units(problem, truncation, units),
            "alpha": torch.full((problem.batch,), alpha, dtype=torch.float64),
            "input_identity_fallback": truncation.identity_input,
        },
    )


def _truncation(problem: Problem, near: Moment, far: Moment) -> Truncation:
    return kronecker_truncation(problem.weight, problem.rank, near, far, problem.names)


def _original_units(
    problem: Problem, truncation: Truncation, statistic_units: torch.Tensor
) -> torch.Tensor:
    """The solver's objective in the units of the weight and the statistics as given."""
    return truncation.objective * problem.weight_scale.cpu().square() * statistic_units


def _outputs(
    problem: Problem, truncation: Truncation, started: float, info: dict[str, torch.Tensor]
) -> list[SolverOutput]:
    """One exact output per layer; ``info`` holds one (b,) tensor per reported fact."""
    dtype = problem.weight.dtype
    outputs = exact_outputs(problem, truncation.left.to(dtype), truncation.right.to(dtype), started)
    for k, output in enumerate(outputs):
        output.info = {name: values[k].item() for name, values in info.items()}
    return outputs


def _spectrum(moments):
    """The spectrum of a family member from its moments (see :mod:`.spectra`)."""

    def spectrum(problem: Problem, options: Options, terms: bool = False) -> Spectrum:
        return whitened_spectrum(problem, *moments(problem, options), terms)

    return spectrum


SPECS = {
    "kfwsvd": SolverSpec(
        solve_kfwsvd,
        DampedOptions,
        _spectrum(kfwsvd_moments),
        "kfwsvd",
        KFWSVD_NEEDS,
    ),
    "svd_llm": SolverSpec(
        solve_svd_llm, DampedOptions, _spectrum(svd_llm_moments), "svd_llm", ("input_moment",)
    ),
    "asvd": SolverSpec(
        solve_asvd, AsvdOptions, _spectrum(asvd_moments), "asvd", ("input_abs_mean",)
    ),
}
