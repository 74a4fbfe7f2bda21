"""TFWSVD, the default element-wise solver: preconditioned nonlinear conjugate gradients on (A, B).

From the two-sided closed form, Polak–Ribière+ directions (restarted every ``restart``
iterations) preconditioned by the separable ``I ≈ u vᵀ`` blocks (:class:`Preconditioner`) or, by
default, their exact diagonals in one shared basis per side (:class:`RotatedPreconditioner`), and
an exact line search: along ``(dA, dB)`` the loss is a quartic in the step, minimised through the
roots of its cubic derivative, so every iteration decreases the loss with no step size to tune
(docs/METHOD.md, "tfwsvd"). One iteration costs five (out × r × in) matmuls, batched over the
layers of a group, and two chunked sweeps over the element-wise arrays (:class:`Workspace`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from weighted_lowrank.lowrank.devices import (
    batched_eigh,
    cpu_workers,
    on_one_cpu_thread,
    run_on_workers,
    split_batch,
)
from weighted_lowrank.lowrank.solvers._common import (
    NON_NEGATIVE,
    Batched,
    IterateState,
    IterativeOptions,
    Problem,
    SolverOutput,
    SolverSpec,
    initial_factors,
    int_at_least,
    one_of,
    option,
    positive_weights,
    run_iterations,
)
from weighted_lowrank.lowrank.solvers.spectra import PROXY_CURVE, proxy_spectrum


# tol 1e-4 over 3 iterations: every layer of the default model within 0.07 % of its best known
# loss; the preconditioner is rebuilt only at restarts (more often bought nothing for 13 % more
# CPU time). Measurements: docs/METHOD.md, "tfwsvd".
@dataclass(frozen=True)
class TfwsvdOptions(IterativeOptions):
    max_iters: int = option(150, int_at_least(0))
    tol: float = option(1e-4, NON_NEGATIVE)
    restart: int = option(50, int_at_least(1))
    refresh_every: int = option(10, int_at_least(1))
    precondition_every: int = option(50, int_at_least(1))
    #: The shared-basis block-Jacobi (:class:`RotatedPreconditioner`) or the separable one.
    preconditioner: str = option("rotated", one_of("rotated", "separable"))


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
    inverse_factor = _inverse_cholesky_factor(matrix).to(matrix.dtype)
    return inverse_factor.transpose(1, 2) @ inverse_factor


def _inverse_cholesky_factor(matrix: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` (float64) of ``M + ridge = L Lᵀ`` for each PSD r × r matrix, the ridge relative
    (1e-7 × mean diagonal, raised ×100 until the Cholesky succeeds)."""
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
    return torch.linalg.solve_triangular(factor, identity.expand_as(factor), upper=False)


@dataclass(frozen=True, kw_only=True, eq=False)
class Preconditioner(Batched):
    """The separable importance ``I ≈ u vᵀ`` (``rows`` = u, ``cols`` = v) and the inverse Grams
    ``(Aᵀ D_u A)⁻¹``, ``(B D_v Bᵀ)⁻¹`` at the factors they were last refreshed at."""

    rows: torch.Tensor
    cols: torch.Tensor
    left_inverse: torch.Tensor
    right_inverse: torch.Tensor

    @classmethod
    def start(
        cls, importance: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> Preconditioner:
        rows, cols = separable_weights(importance)
        empty = torch.empty(0, device=left.device)
        placeholder = cls(rows=rows, cols=cols, left_inverse=empty, right_inverse=empty)
        return placeholder.refreshed(importance, left, right)

    def refreshed(
        self, importance: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> Preconditioner:
        """The inverse Grams at (A, B)."""
        left_gram = left.transpose(1, 2) @ (left * self.rows[:, :, None])
        right_gram = (right * self.cols[:, None, :]) @ right.transpose(1, 2)
        return replace(
            self,
            left_inverse=split_batch(_inverse_gram, left_gram),
            right_inverse=split_batch(_inverse_gram, right_gram),
        )

    def apply(
        self, grad_left: torch.Tensor, grad_right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_u⁻¹ ∇_A (B D_v Bᵀ)⁻¹, (Aᵀ D_u A)⁻¹ ∇_B D_v⁻¹)``."""
        direction_left = (grad_left @ self.right_inverse).div_(self.rows[:, :, None])
        direction_right = (self.left_inverse @ grad_right).div_(self.cols[:, None, :])
        return direction_left, direction_right


@dataclass(frozen=True, kw_only=True, eq=False)
class RotatedPreconditioner(Batched):
    """Block-Jacobi in a shared basis: each row's Hessian block ``H_i = B diag(I_i) Bᵀ`` (and each
    column's) approximated by its exact diagonal in one r × r basis per side (docs/METHOD.md).

    Row side: ``T = L⁻ᵀ V``, ``L⁻¹`` whitening ``B D_v Bᵀ`` and ``V`` the eigenvectors of
    ``Σ_k s_k² C(p_k)²``, ``C(p) = L⁻¹ B diag(p) Bᵀ L⁻ᵀ``, over the leading principal components
    ``s_k p_k`` of the rows' profiles ``I_i / u_i``; then ``H_i ≈ T⁻ᵀ diag(d_i) T⁻¹`` with the
    exact ``d_i = Σ_j I_ij (Tᵀ b_j)²``, and the row gradient becomes ``((g_i T) / d_i) Tᵀ``.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    row_profiles: torch.Tensor
    col_profiles: torch.Tensor
    row_basis: torch.Tensor
    col_basis: torch.Tensor
    row_diagonal: torch.Tensor
    col_diagonal: torch.Tensor

    @classmethod
    def start(
        cls, importance: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> RotatedPreconditioner:
        rows, cols = separable_weights(importance)
        empty = torch.empty(0, device=left.device)
        placeholder = cls(
            rows=rows,
            cols=cols,
            row_profiles=_profile_components(importance / rows[:, :, None]),
            col_profiles=_profile_components((importance / cols[:, None, :]).transpose(1, 2)),
            row_basis=empty,
            col_basis=empty,
            row_diagonal=empty,
            col_diagonal=empty,
        )
        return placeholder.refreshed(importance, left, right)

    def refreshed(
        self, importance: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> RotatedPreconditioner:
        dtype = left.dtype
        row_basis = _rotated_basis(right, self.cols, self.row_profiles).to(dtype)
        col_basis = _rotated_basis(left.transpose(1, 2), self.rows, self.col_profiles).to(dtype)
        # d_i = Σ_j I_ij (Tᵀ b_j)², d_j = Σ_i I_ij (a_i T)²: one matmul with I per side.
        row_diagonal = importance @ (row_basis.transpose(1, 2) @ right).square_().transpose(1, 2)
        col_diagonal = (left @ col_basis).square_().transpose(1, 2) @ importance
        return replace(
            self,
            row_basis=row_basis,
            col_basis=col_basis,
            row_diagonal=positive_weights(row_diagonal, dim=1),
            col_diagonal=positive_weights(col_diagonal, dim=2),
        )

    def apply(
        self, grad_left: torch.Tensor, grad_right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``((g_i T_R) / d_i) T_Rᵀ`` per row of ∇_A, ``T_C ((T_Cᵀ g_j) / d_j)`` per column of ∇_B."""
        scaled_left = (grad_left @ self.row_basis).div_(self.row_diagonal)
        scaled_right = (self.col_basis.transpose(1, 2) @ grad_right).div_(self.col_diagonal)
        return scaled_left @ self.row_basis.transpose(1, 2), self.col_basis @ scaled_right


#: Principal components of the row (column) profiles that choose the shared basis.
_PROFILE_COMPONENTS = 8
#: Subspace iterations that find them (randomised range finder, oversampled by 4).
_PROFILE_ITERATIONS = 3


def _profile_components(profiles: torch.Tensor) -> torch.Tensor:
    """``(b, k, m)``: the leading principal components ``s_k p_k`` of each layer's ``n`` profiles
    ``(b, n, m)`` about their mean, by subspace iteration from a fixed Gaussian start."""
    batch, count, size = profiles.shape
    width = min(_PROFILE_COMPONENTS + 4, count, size)
    mean = profiles.mean(dim=1, keepdim=True)

    def times(vectors: torch.Tensor) -> torch.Tensor:  # (profiles − mean) @ vectors
        return profiles @ vectors - mean @ vectors

    def times_t(vectors: torch.Tensor) -> torch.Tensor:  # (profiles − mean)ᵀ @ vectors
        return profiles.transpose(1, 2) @ vectors - mean.transpose(1, 2) * vectors.sum(
            dim=1, keepdim=True
        )

    generator = torch.Generator().manual_seed(0)
    # The same start for every layer: a layer's components do not depend on its batch.
    start = torch.randn(size, width, generator=generator, dtype=profiles.dtype)
    basis = torch.linalg.qr(times_t(times(start.to(profiles.device).expand(batch, -1, -1)))).Q
    for _ in range(_PROFILE_ITERATIONS - 1):
        basis = torch.linalg.qr(times_t(times(basis))).Q
    _, singular, right_vectors = torch.linalg.svd(times(basis), full_matrices=False)
    components = basis @ right_vectors.transpose(1, 2)
    keep = min(_PROFILE_COMPONENTS, width)
    return (components[:, :, :keep] * singular[:, None, :keep]).transpose(1, 2)


def _rotated_basis(
    factor: torch.Tensor, weights: torch.Tensor, profiles: torch.Tensor
) -> torch.Tensor:
    """``T = L⁻ᵀ V`` (float64) for the blocks ``factor diag(·) factorᵀ`` (factor (b, r, m)):
    ``L⁻¹`` whitens ``factor D_weights factorᵀ``, ``V`` diagonalises ``Σ_k C(p_k)²``."""
    gram = (factor * weights[:, None, :]) @ factor.transpose(1, 2)
    inverse_factor = split_batch(_inverse_cholesky_factor, gram)
    whitened = inverse_factor.to(factor.dtype) @ factor
    second_moment = torch.zeros_like(gram, dtype=torch.float64)
    for component in profiles.unbind(dim=1):
        block = (whitened * component[:, None, :]) @ whitened.transpose(1, 2)
        second_moment += (block @ block).double()
    _, vectors = batched_eigh((second_moment + second_moment.transpose(1, 2)) / 2)
    return inverse_factor.transpose(1, 2) @ vectors


_PRECONDITIONER_CLASSES = {"rotated": RotatedPreconditioner, "separable": Preconditioner}


@dataclass(frozen=True, kw_only=True, eq=False)
class Gradient(Batched):
    """Half-gradients ``E Bᵀ``, ``Aᵀ E`` (CG with an exact line search ignores the scale), their
    preconditioned ``z`` and ``gᵀz`` (the next Polak–Ribière denominator)."""

    grad_left: torch.Tensor
    grad_right: torch.Tensor
    pre_left: torch.Tensor
    pre_right: torch.Tensor
    grad_dot_pre: torch.Tensor

    @classmethod
    def of(
        cls,
        grad_left: torch.Tensor,
        grad_right: torch.Tensor,
        preconditioner: Preconditioner | RotatedPreconditioner,
    ) -> Gradient:
        pre_left, pre_right = preconditioner.apply(grad_left, grad_right)
        return cls(
            grad_left=grad_left,
            grad_right=grad_right,
            pre_left=pre_left,
            pre_right=pre_right,
            grad_dot_pre=_dot(grad_left, pre_left) + _dot(grad_right, pre_right),
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class TfwsvdState(IterateState):
    """The CG iterate: preconditioner, gradient, direction, ``root = √I`` and ``scaled_residual =
    √I ∘ (AB − W)``; the workspace holds the line search's ``√I ∘ P``, ``√I ∘ Q``."""

    root: torch.Tensor
    scaled_residual: torch.Tensor
    preconditioner: Preconditioner | RotatedPreconditioner
    gradient: Gradient
    dir_left: torch.Tensor
    dir_right: torch.Tensor
    workspace: Workspace


def quartic_minimiser(coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global minimiser ``t`` and minimum of ``Σ_k c_k t^k`` (k = 0..4) for each row (float64):
    the best of ``t = 0`` and the real roots of the cubic derivative (companion matrix), or the
    quadratic's vertex when the quartic term vanishes."""
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


def solve_tfwsvd(problem: Problem, options: TfwsvdOptions, started: float) -> list[SolverOutput]:
    """Preconditioned nonlinear CG with exact quartic line search (see the module docstring)."""
    weight, importance = problem.weight, problem.importance
    left, right = initial_factors(problem, options.init, options.seed)
    preconditioner = _PRECONDITIONER_CLASSES[options.preconditioner].start(importance, left, right)
    root = importance.clamp_min(0).sqrt()
    scaled_residual = torch.empty_like(weight)
    workspace = Workspace.for_problem(weight)
    grad_left, grad_right = _update_and_gradient(
        root, scaled_residual, weight, workspace, left, right
    )
    gradient = Gradient.of(grad_left, grad_right, preconditioner)
    state = TfwsvdState(
        weight=weight,
        importance=importance,
        left=left,
        right=right,
        root=root,
        scaled_residual=scaled_residual,
        preconditioner=preconditioner,
        gradient=gradient,
        dir_left=-gradient.pre_left,
        dir_right=-gradient.pre_right,
        workspace=workspace,
    )
    return run_iterations(
        state, lambda state: _cg_step(state, options), options, started, window=TFWSVD_WINDOW
    )


def _cg_step(state: TfwsvdState, options: TfwsvdOptions) -> tuple[TfwsvdState, torch.Tensor]:
    """One CG iteration: exact line search along the direction, then the next direction."""
    iteration = state.iteration
    coefficients = _line_search_coefficients(state)
    step_size, _ = on_one_cpu_thread(quartic_minimiser, coefficients)
    t = step_size.to(state.left.device, state.left.dtype)[:, None, None]
    left = torch.addcmul(state.left, t, state.dir_left)
    right = torch.addcmul(state.right, t, state.dir_right)
    # The running residual drifts in float32; recompute it now and then.
    step = None if iteration % options.refresh_every == 0 else t
    grad_left, grad_right = _update_and_gradient(
        state.root, state.scaled_residual, state.weight, state.workspace, left, right, step
    )
    preconditioner = state.preconditioner
    if iteration % options.precondition_every == 0:
        # Rebuilt with the restart by default: a metric that changes under PR+ between restarts
        # breaks the conjugacy of the directions, and the Grams drift slowly.
        preconditioner = preconditioner.refreshed(state.importance, left, right)
    previous = state.gradient
    gradient = Gradient.of(grad_left, grad_right, preconditioner)
    # Polak–Ribière+: β = g_newᵀ(z_new − z_old) / g_oldᵀ z_old, clipped at 0.
    cross = _dot(gradient.grad_left, previous.pre_left) + _dot(
        gradient.grad_right, previous.pre_right
    )
    beta = ((gradient.grad_dot_pre - cross) / previous.grad_dot_pre.clamp_min(1e-300)).clamp_min(0)
    if iteration % options.restart == 0:
        beta = torch.zeros_like(beta)
    beta = beta.to(left.dtype)[:, None, None]
    new_state = replace(
        state,
        left=left,
        right=right,
        preconditioner=preconditioner,
        gradient=gradient,
        dir_left=torch.mul(state.dir_left, beta).sub_(gradient.pre_left),
        dir_right=torch.mul(state.dir_right, beta).sub_(gradient.pre_right),
    )
    return new_state, coefficients[:, 0]


# ----------------------------------------------------------------------------- element-wise work
# Everything of size out × in happens in two sweeps per iteration over cache-sized chunks (the line
# search, then the update): on the shared 2-core CPU a whole-batch pass ran at DRAM speed, 3–4×
# slower than on a cache-resident chunk.

#: Elements per array in one chunk on CPU (1 MiB of float32): the six arrays a chunk touches
#: stay in the shared L3 cache, and each chunk's matmuls keep ≥ a few hundred rows.
_CPU_CHUNK_ELEMENTS = 1 << 18


@dataclass(eq=False)
class Workspace:
    """Chunk layout of a (batch, out, in) problem and one reused scratch buffer per worker (a
    fresh tensor per chunk would page-fault on CPU). Not per layer: :meth:`Batched.select`
    carries it over and the chunks are recomputed for the running layers."""

    chunk_elements: int | None
    buffers: list[torch.Tensor]
    line: torch.Tensor

    def line_buffers(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Two ``shape`` arrays for ``√I ∘ P`` and ``√I ∘ Q`` (views of one buffer that is
        allocated for the first, largest batch)."""
        size = shape[0] * shape[1] * shape[2]
        self.line = _at_least(self.line, 2 * size)
        return self.line[:size].view(shape), self.line[size : 2 * size].view(shape)

    @classmethod
    def for_problem(cls, weight: torch.Tensor) -> Workspace:
        on_cpu = weight.device.type == "cpu"
        workers = cpu_workers(weight.device)
        empty = [torch.empty(0, dtype=weight.dtype, device=weight.device) for _ in range(workers)]
        return cls(_CPU_CHUNK_ELEMENTS if on_cpu else None, empty, empty[0])

    @property
    def workers(self) -> int:
        return len(self.buffers)

    def chunks(self, shape: torch.Size) -> list[tuple[slice, slice]]:
        """``(layers, rows)`` blocks that cover a ``(batch, out, in)`` array: several whole layers
        when a layer is smaller than a chunk, else equal row blocks of one layer, and at least one
        block per worker (the whole batch in one block on GPU)."""
        batch, out_features, in_features = shape
        if self.chunk_elements is None:
            return [(slice(0, batch), slice(0, out_features))]
        layer_elements = out_features * in_features
        blocks = max(1, -(-layer_elements // self.chunk_elements))
        layers = 1 if blocks > 1 else max(1, self.chunk_elements // layer_elements)
        if -(-batch // layers) * blocks < self.workers:
            layers, blocks = 1, max(blocks, -(-self.workers // batch))
        rows = -(-out_features // min(blocks, out_features))
        return [
            (slice(first, min(first + layers, batch)), slice(row, min(row + rows, out_features)))
            for first in range(0, batch, layers)
            for row in range(0, out_features, rows)
        ]

    def scratch(self, worker: int, layers: int, rows: int, columns: int) -> torch.Tensor:
        size = layers * rows * columns
        self.buffers[worker] = _at_least(self.buffers[worker], size)
        return self.buffers[worker][:size].view(layers, rows, columns)

    def run(self, shape: torch.Size, work: Callable[[int, list[tuple[slice, slice]]], Any]) -> list:
        """``work(worker, chunks)`` for each worker on its fixed share of the chunks (every
        ``workers``-th, so the results do not depend on timing), in parallel
        (:func:`~weighted_lowrank.lowrank.devices.run_on_workers`)."""
        chunks = self.chunks(shape)
        workers = min(self.workers, len(chunks))
        return run_on_workers(
            [
                lambda worker=worker: work(worker, chunks[worker::workers])
                for worker in range(workers)
            ]
        )


def _at_least(buffer: torch.Tensor, size: int) -> torch.Tensor:
    """``buffer``, or a new one of ``size`` elements when it is smaller."""
    return buffer if buffer.numel() >= size else buffer.new_empty(size)


def _line_search_coefficients(state: TfwsvdState) -> torch.Tensor:
    """The quartic ``Σ_k c_k t^k`` = loss along ``(dA, dB)``, per layer (float64, (b, 5)): with
    ``R(t) = R + tP + t²Q`` (``P = dA B + A dB``, ``Q = dA dB``, all weighted by √I),
    ``c = (RᵀR, 2 RᵀP, PᵀP + 2 RᵀQ, 2 PᵀQ, QᵀQ)``. Fills the workspace's line buffers."""
    left, right, dir_left, dir_right = state.left, state.right, state.dir_left, state.dir_right
    batch, _, in_features = state.root.shape
    scaled_linear, scaled_quadratic = state.workspace.line_buffers(state.root.shape)

    def work(worker: int, chunks: list[tuple[slice, slice]]) -> torch.Tensor:
        products = torch.zeros(batch, 6, dtype=torch.float64, device=left.device)
        for layers, rows in chunks:
            root = state.root[layers, rows]
            residual = state.scaled_residual[layers, rows]
            linear = scaled_linear[layers, rows]
            quadratic = scaled_quadratic[layers, rows]
            scratch = state.workspace.scratch(worker, root.shape[0], root.shape[1], in_features)
            torch.bmm(dir_left[layers, rows], right[layers], out=scratch)
            scratch.baddbmm_(left[layers, rows], dir_right[layers])
            torch.mul(scratch, root, out=linear)
            torch.bmm(dir_left[layers, rows], dir_right[layers], out=scratch)
            torch.mul(scratch, root, out=quadratic)
            pairs = (
                (residual, residual),
                (residual, linear),
                (linear, linear),
                (residual, quadratic),
                (linear, quadratic),
                (quadratic, quadratic),
            )
            products[layers] += torch.stack([_dot(first, second) for first, second in pairs], dim=1)
        return products

    products = sum(state.workspace.run(state.root.shape, work))
    rr, rp, pp, rq, pq, qq = products.unbind(dim=1)
    return torch.stack([rr, 2 * rp, pp + 2 * rq, 2 * pq, qq], dim=1)


def _update_and_gradient(
    root: torch.Tensor,
    scaled_residual: torch.Tensor,
    weight: torch.Tensor,
    workspace: Workspace,
    left: torch.Tensor,
    right: torch.Tensor,
    step: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the weighted residual to ``(A, B)`` — along the line with ``step`` (t, (b, 1, 1)),
    else recomputed as ``√I ∘ (AB − W)`` — and return the half-gradients ``E Bᵀ``, ``Aᵀ E``
    there, ``E = I ∘ (AB − W)`` (``Aᵀ E`` summed over row blocks, per worker, then over workers).
    """
    batch, out_features, in_features = root.shape
    rank = left.shape[2]
    grad_left = torch.empty(batch, out_features, rank, dtype=left.dtype, device=left.device)
    right_t = right.transpose(1, 2)
    if step is not None:
        scaled_linear, scaled_quadratic = workspace.line_buffers(root.shape)

    def work(worker: int, chunks: list[tuple[slice, slice]]) -> torch.Tensor:
        grad_right = torch.zeros(batch, rank, in_features, dtype=left.dtype, device=left.device)
        for layers, rows in chunks:
            chunk_root = root[layers, rows]
            residual = scaled_residual[layers, rows]
            scratch = workspace.scratch(
                worker, chunk_root.shape[0], chunk_root.shape[1], in_features
            )
            if step is None:
                torch.baddbmm(
                    weight[layers, rows], left[layers, rows], right[layers], beta=-1, out=scratch
                )
                torch.mul(scratch, chunk_root, out=residual)
            else:
                t = step[layers]
                residual.addcmul_(t, scaled_linear[layers, rows])
                residual.addcmul_(t * t, scaled_quadratic[layers, rows])
            torch.mul(residual, chunk_root, out=scratch)
            grad_left[layers, rows] = torch.bmm(scratch, right_t[layers])
            grad_right[layers].baddbmm_(left[layers, rows].transpose(1, 2), scratch)
        return grad_right

    parts = workspace.run(root.shape, work)
    grad_right = parts[0]
    for part in parts[1:]:
        grad_right.add_(part)
    return grad_left, grad_right


def _dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-layer Frobenius inner product of (layers, rows, columns) arrays or chunks: float32 row
    sums, float64 total (fast and accurate)."""
    return torch.linalg.vecdot(first, second, dim=2).sum(dim=1, dtype=torch.float64)


SPEC = SolverSpec(solve_tfwsvd, TfwsvdOptions, proxy_spectrum, PROXY_CURVE, window=TFWSVD_WINDOW)
