"""Each solver's weighted spectrum: the loss of every rank from one decomposition per layer.

A closed-form solver truncates the SVD of a scaled weight ``M = S_out W S_in`` (plain SVD:
``M = W``; FWSVD: ``√r W √c``; kfwsvd: ``L_Gᵀ W L_A``; svd_llm: ``W L_A``; asvd: ``W diag(s)``),
so the loss of its rank-r solution under its own quadratic ``‖S_out ΔW S_in‖²`` is the tail
``Σ_{i>r} σ_i²`` of M's squared singular values — exact for every rank at once. The element-wise
solvers (tfwsvd, adam, sgd, adam_sgd, als, em) have no such spectrum: their curve is the
two-sided FWSVD spectrum of the same diagonal Fisher (its rank-one fit, with the same marginals
and trace), a documented proxy (docs/METHOD.md "Rank allocation").

A :class:`Spectrum` also carries the traces of the two sides of the curvature the quadratic
assumes (``tr(S_outᵀ S_out)``, ``tr(S_in S_inᵀ)``): the loss curve scales the tail so that this
curvature has the trace of the layer's diagonal Fisher (:func:`rank_losses`), which puts every
solver's curve in nats per example and makes layers comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weighted_lowrank.lowrank.devices import batched_eigvalsh
from weighted_lowrank.lowrank.solvers._common import Problem, positive_weights
from weighted_lowrank.lowrank.solvers.calibrated import ASVD_FLOOR
from weighted_lowrank.lowrank.solvers.whitening import Moment, kronecker_spectrum


@dataclass
class Spectrum:
    """A batch's squared singular values (b, min(out, in)), descending, in the problem's
    normalised units, and the traces (b,) of the output and input sides of its curvature."""

    values: torch.Tensor
    trace_output: torch.Tensor
    trace_input: torch.Tensor


SpectrumFunction = Callable[[Problem, dict[str, Any]], Spectrum]


def svd_spectrum(problem: Problem, options: dict[str, Any]) -> Spectrum:
    """Plain SVD: the squared singular values of W; both sides are identities."""
    _, out_features, in_features = problem.weight.shape
    return Spectrum(
        values=_squared_singular_values(problem.weight),
        trace_output=_full(problem, out_features),
        trace_input=_full(problem, in_features),
    )


def fwsvd_spectrum(problem: Problem, options: dict[str, Any]) -> Spectrum:
    """FWSVD along its ``axis``: the spectrum of ``√r W √c`` (row / column importance sums)."""
    return _fwsvd(problem, options.get("axis", "both"))


def proxy_spectrum(problem: Problem, options: dict[str, Any]) -> Spectrum:
    """The element-wise solvers' proxy: two-sided FWSVD's spectrum of the same importance."""
    return _fwsvd(problem, "both")


def kfwsvd_spectrum(problem: Problem, options: dict[str, Any]) -> Spectrum:
    """kfwsvd: the spectrum of ``L_Gᵀ W L_A`` (damped as the solver damps)."""
    damping = options["damping"]
    near = Moment(problem.input_moment, damping, "input_moment")
    far = Moment(problem.output_moment, damping, "output_moment")
    return Spectrum(
        values=_to_cpu(kronecker_spectrum(problem.weight, near, far, problem.names)),
        trace_output=_trace(far),
        trace_input=_trace(near),
    )


def svd_llm_spectrum(problem: Problem, options: dict[str, Any]) -> Spectrum:
    """svd_llm: the spectrum of ``W L_A``; the output side is the identity."""
    near = Moment(problem.input_moment, options["damping"], "input_moment")
    return Spectrum(
        values=_to_cpu(kronecker_spectrum(problem.weight, near, Moment(None), problem.names)),
        trace_output=_full(problem, problem.weight.shape[1]),
        trace_input=_trace(near),
    )


def asvd_spectrum(problem: Problem, options: dict[str, Any]) -> Spectrum:
    """asvd: the spectrum of ``W diag(s)``, s = (mean |x|)^alpha floored as the solver does."""
    scale = problem.input_abs_mean.pow(float(options["alpha"]))
    scale = scale + ASVD_FLOOR * scale.mean(dim=1, keepdim=True)
    near = Moment(scale.square(), 0.0, "input_abs_mean")
    return Spectrum(
        values=_to_cpu(kronecker_spectrum(problem.weight, near, Moment(None), problem.names)),
        trace_output=_full(problem, problem.weight.shape[1]),
        trace_input=_trace(near),
    )


def rank_losses(
    spectrum: Spectrum, problem: Problem, importance_totals: torch.Tensor, num_examples: int
) -> torch.Tensor:
    """Predicted loss increase (nats per example) of every rank 1..min(out, in), (b, min(out, in)).

    ``½ · (ΣI / N) / (tr_out · tr_in) · Σ_{i>r} σ_i²`` in the weight's original units: the
    solver's quadratic rescaled so that its curvature has the trace of the layer's diagonal
    Fisher (ΣI over N examples). For plain SVD this is the ``identity`` loss model, for FWSVD the
    ``fwsvd`` one (:mod:`~weighted_lowrank.lowrank.loss_models`).
    """
    values = spectrum.values.double().cpu()
    # The tail summed from the smallest value up: no cancellation at high ranks.
    tails = values.flip(-1).cumsum(dim=-1).flip(-1)
    tails = torch.cat([tails[:, 1:], torch.zeros_like(tails[:, :1])], dim=1)
    weight_units = problem.weight_scale.double().cpu().square()
    traces = spectrum.trace_output.double().cpu() * spectrum.trace_input.double().cpu()
    scale = 0.5 * importance_totals.double().cpu() / num_examples * weight_units / traces
    return tails * scale[:, None]


def _fwsvd(problem: Problem, axis: str) -> Spectrum:
    _, out_features, in_features = problem.weight.shape
    importance = problem.importance.double()
    scaled = problem.weight.double()
    trace_output, trace_input = _full(problem, out_features), _full(problem, in_features)
    if axis in ("out", "both"):
        rows = positive_weights(importance.sum(dim=2))
        scaled = scaled * rows.sqrt()[:, :, None]
        trace_output = rows.sum(dim=1).cpu()
    if axis in ("in", "both"):
        columns = positive_weights(importance.sum(dim=1))
        scaled = scaled * columns.sqrt()[:, None, :]
        trace_input = columns.sum(dim=1).cpu()
    return Spectrum(_squared_singular_values(scaled), trace_output, trace_input)


def _squared_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the smaller Gram matrix, descending: 10× faster than ``svdvals`` in float64
    on the default model's layers; squaring the condition number costs ~1e-16·σ₁² absolute per
    value, nothing next to any loss a rank decision turns on."""
    matrix = matrix.double()
    tall = matrix.shape[1] >= matrix.shape[2]
    gram = matrix.transpose(1, 2) @ matrix if tall else matrix @ matrix.transpose(1, 2)
    return _to_cpu(batched_eigvalsh(gram).flip(-1).clamp_min(0))


def _trace(moment: Moment) -> torch.Tensor:
    """The trace of the moment the solve uses (zero layers: the identity's)."""
    used = moment.used()
    values = used if moment.diagonal else used.diagonal(dim1=1, dim2=2)
    return values.double().sum(dim=1).cpu()


def _full(problem: Problem, size: int) -> torch.Tensor:
    return torch.full((problem.batch,), float(size), dtype=torch.float64)


def _to_cpu(values: torch.Tensor) -> torch.Tensor:
    return values.double().cpu()
