"""Each solver's weighted spectrum: the loss of every rank from one decomposition per layer.

A closed-form solver truncates the SVD of a scaled weight ``M = S_out W S_in`` (SVD: ``W``;
FWSVD: ``√r W √c``; the Kronecker family: :func:`whitened_spectrum` of its moments), so its
rank-r loss under its own quadratic is the tail ``Σ_{i>r} σ_i²``. The element-wise solvers have
no spectrum: their curve is two-sided FWSVD's, a documented proxy (docs/METHOD.md "Rank
allocation"). With ``terms`` a spectrum carries the truncation path that
:func:`kronecker_rank_losses` prices instead; its two curvature traces scale every curve to the
trace of the layer's diagonal Fisher (:func:`rank_losses`), in nats per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from weighted_lowrank.lowrank.devices import batched_eigh, batched_eigvalsh
from weighted_lowrank.lowrank.solvers._common import Problem, positive_weights
from weighted_lowrank.lowrank.solvers.whitening import (
    Moment,
    kronecker_expansion,
    kronecker_spectrum,
)


@dataclass
class Spectrum:
    """A batch's squared singular values (b, min(out, in)), descending, in normalised units, the
    traces (b,) of the two sides of its curvature and, with ``terms``, the truncation path
    ``W = Σ_i left[:, :, i] right[:, :, i]ᵀ`` (rank r keeps the first r terms)."""

    values: torch.Tensor
    trace_output: torch.Tensor
    trace_input: torch.Tensor
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None


#: The curve of the element-wise solvers, which have no spectrum of their own.
PROXY_CURVE = "fwsvd (proxy)"


def svd_spectrum(problem: Problem, options: Any, terms: bool = False) -> Spectrum:
    """Plain SVD: the squared singular values of W; both sides are identities."""
    _, out_features, in_features = problem.weight.shape
    values, left, right = _gram_expansion(problem.weight, terms)
    return Spectrum(values, _full(problem, out_features), _full(problem, in_features), left, right)


def fwsvd_spectrum(problem: Problem, options: Any, terms: bool = False) -> Spectrum:
    """FWSVD along its ``axis``: the spectrum of ``√r W √c`` (row / column importance sums)."""
    return _fwsvd(problem, options.axis, terms)


def proxy_spectrum(problem: Problem, options: Any, terms: bool = False) -> Spectrum:
    """The element-wise solvers' proxy: two-sided FWSVD's spectrum of the same importance."""
    return _fwsvd(problem, "both", terms)


def rank_losses(
    spectrum: Spectrum, problem: Problem, importance_totals: torch.Tensor, num_examples: int
) -> torch.Tensor:
    """Predicted loss increase (nats per example) of every rank 1..min(out, in), (b, min(out, in)):
    ``½ · (ΣI / N) / (tr_out · tr_in) · Σ_{i>r} σ_i²`` in the weight's original units (for SVD
    and FWSVD the ``identity`` and ``fwsvd`` models of :mod:`~weighted_lowrank.lowrank.loss_models`).
    """
    values = spectrum.values.double().cpu()
    # The tail summed from the smallest value up: no cancellation at high ranks.
    tails = values.flip(-1).cumsum(dim=-1).flip(-1)
    tails = torch.cat([tails[:, 1:], torch.zeros_like(tails[:, :1])], dim=1)
    traces = spectrum.trace_output.double().cpu() * spectrum.trace_input.double().cpu()
    return tails * _fisher_scale(problem, importance_totals, num_examples, traces)[:, None]


def _fisher_scale(
    problem: Problem, importance_totals: torch.Tensor, num_examples: int, traces: torch.Tensor
) -> torch.Tensor:
    """``½ (ΣI / N) / traces`` in the weight's original units: what scales a curve's curvature to
    the trace of the layer's diagonal Fisher."""
    weight_units = problem.weight_scale.double().cpu().square()
    return 0.5 * importance_totals.double().cpu() / num_examples * weight_units / traces


def kronecker_rank_losses(
    spectrum: Spectrum, problem: Problem, importance_totals: torch.Tensor, num_examples: int
) -> torch.Tensor:
    """:func:`rank_losses` with the solver's truncation path priced by ``½ tr(ΔWᵀ G ΔW A)`` (the
    best predictor of the measured damage, docs/METHOD.md): ``tr(ΔW_rᵀ G ΔW_r A) =
    Σ_{i,j>r} (p_iᵀ G p_j)(q_jᵀ A q_i)``, a suffix sum of ``(PᵀGP) ⊙ (QᵀAQ)``."""
    if spectrum.left is None or spectrum.right is None:
        raise ValueError("kronecker_rank_losses needs a spectrum computed with its terms")
    output_moment = Moment(problem.output_moment, 0.0, "output_moment").used()
    input_moment = Moment(problem.input_moment, 0.0, "input_moment").used()
    if output_moment is None or input_moment is None:
        raise ValueError(
            "the kronecker loss model needs the input_moment and output_moment of every layer"
        )
    left, right = spectrum.left.double(), spectrum.right.double()
    pairs = (left.transpose(1, 2) @ output_moment @ left) * (
        right.transpose(1, 2) @ input_moment @ right
    )
    # suffix[r, r] = Σ_{i,j ≥ r} pairs[i, j]: the loss of keeping the first r terms.
    suffix = pairs.flip(-1, -2).cumsum(-1).cumsum(-2).flip(-1, -2)
    dropped_from = suffix.diagonal(dim1=1, dim2=2)
    losses = torch.cat(
        [dropped_from[:, 1:], torch.zeros_like(dropped_from[:, :1])], dim=1
    ).clamp_min(0)
    traces = _trace(output_moment) * _trace(input_moment)
    return losses.cpu() * _fisher_scale(problem, importance_totals, num_examples, traces)[:, None]


def _fwsvd(problem: Problem, axis: str, terms: bool) -> Spectrum:
    _, out_features, in_features = problem.weight.shape
    importance = problem.importance.double()
    scaled = problem.weight.double()
    trace_output, trace_input = _full(problem, out_features), _full(problem, in_features)
    rows = columns = None
    if axis in ("out", "both"):
        rows = positive_weights(importance.sum(dim=2))
        scaled = scaled * rows.sqrt()[:, :, None]
        trace_output = rows.sum(dim=1).cpu()
    if axis in ("in", "both"):
        columns = positive_weights(importance.sum(dim=1))
        scaled = scaled * columns.sqrt()[:, None, :]
        trace_input = columns.sum(dim=1).cpu()
    values, left, right = _gram_expansion(scaled, terms)
    if terms:
        # W = D_r^{-½} M D_c^{-½}: unscale each term's sides.
        left = left if rows is None else left / rows.sqrt()[:, :, None]
        right = right if columns is None else right / columns.sqrt()[:, :, None]
    return Spectrum(values, trace_output, trace_input, left, right)


def whitened_spectrum(problem: Problem, near: Moment, far: Moment, terms: bool) -> Spectrum:
    """A Kronecker-family spectrum (``near`` on the input side, ``far`` on the output side; an
    identity side's trace is its size)."""
    if terms:
        expansion = kronecker_expansion(problem.weight, near, far, problem.names)
        values, left, right = expansion.values, expansion.left, expansion.right
    else:
        values = kronecker_spectrum(problem.weight, near, far, problem.names)
        left = right = None
    trace_output = (
        _full(problem, problem.weight.shape[1]) if far.matrix is None else _trace(far.used())
    )
    return Spectrum(values.double().cpu(), trace_output, _trace(near.used()), left, right)


def _gram_expansion(
    matrix: torch.Tensor, terms: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Squared singular values of each matrix (descending) and with ``terms`` the rank-one terms
    ``M = Σ (M v_i)(v_i)ᵀ`` (tall) or ``Σ u_i (Mᵀ u_i)ᵀ`` (wide), from the smaller Gram matrix:
    10× faster than ``svdvals`` in float64, for ~1e-16·σ₁² absolute error per value."""
    matrix = matrix.double()
    tall = matrix.shape[1] >= matrix.shape[2]
    gram = matrix.transpose(1, 2) @ matrix if tall else matrix @ matrix.transpose(1, 2)
    if not terms:
        return batched_eigvalsh(gram).flip(-1).clamp_min(0).double().cpu(), None, None
    eigenvalues, eigenvectors = batched_eigh(gram)
    vectors = eigenvectors.flip(-1)
    values = eigenvalues.flip(-1).clamp_min(0).double().cpu()
    if tall:
        return values, matrix @ vectors, vectors
    return values, vectors, matrix.transpose(1, 2) @ vectors


def _trace(matrix: torch.Tensor) -> torch.Tensor:
    """Per layer, the trace of a (b, n, n) or diagonal (b, n) moment."""
    values = matrix if matrix.ndim == 2 else matrix.diagonal(dim1=1, dim2=2)
    return values.double().sum(dim=1).cpu()


def _full(problem: Problem, size: int) -> torch.Tensor:
    return torch.full((problem.batch,), float(size), dtype=torch.float64)
