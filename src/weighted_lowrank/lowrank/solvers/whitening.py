"""Exact rank-r minimiser of a Kronecker-factored quadratic, batched: the math of ``kfwsvd``,
``svd_llm``, ``asvd`` and the ``init="kfwsvd"`` start of the iterative solvers.

With ΔW = W − left·right, A = L_A L_Aᵀ (in × in) and G = L_G L_Gᵀ (out × out),
``tr(ΔWᵀ G ΔW A) = ‖L_Gᵀ ΔW L_A‖²``, so the truncated SVD ``U_r S_r V_rᵀ`` of
``M = L_Gᵀ W L_A`` mapped back (left = L_G⁻ᵀ U_r √S_r, right = √S_r V_rᵀ L_A⁻¹) is the exact
minimiser, and the loss is ``Σ_{i>r} s_i²`` (SVD-LLM's "truncation-aware" property). G = I gives
activation whitening (SVD-LLM), A = diag(s²) ASVD's scaling, A = G = I plain SVD.

Only the smaller side is factorised: for a tall layer (out ≥ in) the right singular pairs of M
are the eigenpairs of ``L_Aᵀ (Wᵀ G W) L_A`` (in × in) and ``left = W L_A V_r S_r^{-½}``; a wide
layer is solved transposed. In float64 the squared condition number leaves each kept singular
value ~1e-16·s_1²/s_r² relative error. Damping, the identity fallback of an all-zero moment and
zero rows of A: docs/METHOD.md, "Damping".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weighted_lowrank.lowrank.devices import batched_eigh, batched_eigvalsh

#: Default relative damping of a moment: × its mean diagonal, added to its diagonal. The
#: independent check of issue 12 used 1e-6 (0.796 accuracy at budget 0.5 on the default model).
DEFAULT_DAMPING = 1e-6
#: How many times a failed Cholesky raises its damping ×10 before the layer is an error.
MAX_DAMPING_RAISES = 6
#: Smallest kept singular value, relative to the largest, that the mapping back divides by. It
#: only splits a near-null direction between the two factors: the product does not depend on it.
_SINGULAR_FLOOR = 1e-12


@dataclass
class Moment:
    """One side of the quadratic for a batch: ``None`` (identity), (b, n, n) dense or (b, n)
    diagonal, normalised to mean diagonal 1 (or all zero); ``damping`` is relative to that."""

    matrix: torch.Tensor | None
    damping: float = 0.0
    name: str = "moment"

    @property
    def diagonal(self) -> bool:
        return self.matrix is not None and self.matrix.ndim == 2

    def zero(self, batch: int = 0) -> torch.Tensor:
        """Which of the ``batch`` layers have an all-zero moment (replaced by the identity), on
        the CPU; none for an identity side."""
        if self.matrix is None:
            return torch.zeros(batch, dtype=torch.bool)
        values = self.matrix if self.diagonal else self.matrix.diagonal(dim1=1, dim2=2)
        return ~(values > 0).any(dim=1).cpu()

    def used(self) -> torch.Tensor | None:
        """The moment the solve uses: zero layers replaced by the identity (undamped)."""
        if self.matrix is None:
            return None
        zero = self.zero().to(self.matrix.device)
        if not bool(zero.any()):
            return self.matrix
        size = self.matrix.shape[1]
        if self.diagonal:
            identity = torch.ones(size, dtype=self.matrix.dtype, device=self.matrix.device)
            return torch.where(zero[:, None], identity, self.matrix)
        identity = torch.eye(size, dtype=self.matrix.dtype, device=self.matrix.device)
        return torch.where(zero[:, None, None], identity, self.matrix)


@dataclass
class Truncation:
    """Factors of a batch (float64) and per layer ``tr(ΔWᵀ G ΔW A)`` under the moments as given
    (``objective``), the relative damping used and whether a moment was replaced by the identity.
    """

    left: torch.Tensor
    right: torch.Tensor
    objective: torch.Tensor
    damping_input: torch.Tensor
    damping_output: torch.Tensor
    identity_input: torch.Tensor
    identity_output: torch.Tensor


def kronecker_truncation(
    weight: torch.Tensor, rank: int, input_moment: Moment, output_moment: Moment, names: list[str]
) -> Truncation:
    """The exact rank-``rank`` minimiser of ``tr(ΔWᵀ G ΔW A)`` for each layer of a batch, float64."""
    weight = weight.double()
    if weight.shape[1] >= weight.shape[2]:
        return _tall_truncation(weight, rank, input_moment, output_moment, names)
    # A wide layer is the tall problem of Wᵀ with the two moments' roles swapped.
    swapped = _tall_truncation(weight.mT, rank, output_moment, input_moment, names)
    return Truncation(
        left=swapped.right.transpose(1, 2),
        right=swapped.left.transpose(1, 2),
        objective=swapped.objective,
        damping_input=swapped.damping_output,
        damping_output=swapped.damping_input,
        identity_input=swapped.identity_output,
        identity_output=swapped.identity_input,
    )


def balance_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal norms of column k of ``left`` and row k of ``right``, same product (balanced factors
    keep a later gradient refinement well conditioned)."""
    left_norms = left.norm(dim=-2)
    right_norms = right.norm(dim=-1)
    usable = (left_norms > 0) & (right_norms > 0)
    ratio = torch.where(usable, right_norms / torch.where(usable, left_norms, 1.0), 1.0).sqrt()
    return left * ratio.unsqueeze(-2), right / ratio.unsqueeze(-1)


def _tall_truncation(
    weight: torch.Tensor, rank: int, near: Moment, far: Moment, names: list[str]
) -> Truncation:
    """Tall case (out ≥ in): ``near`` (in × in) is factorised, ``far`` enters via ``Wᵀ far W``."""
    batch = weight.shape[0]
    whitened = _whitened_gram(weight, near, far, names)
    root, given_gram = whitened.root, whitened.given_gram
    eigenvalues, eigenvectors = batched_eigh(whitened.matrix)
    kept = eigenvectors.flip(-1)[:, :, :rank]
    singular = eigenvalues.flip(-1)[:, :rank].clamp_min(0).sqrt()
    singular = singular.clamp_min(_SINGULAR_FLOOR * singular[:, :1].clamp_min(1e-300))
    root_singular = singular.sqrt()
    rooted = _times_root(kept.transpose(1, 2), root, transpose=True).transpose(1, 2)  # L V_r
    unrooted = _solve_root(kept.transpose(1, 2), root)  # V_rᵀ L⁻¹
    left = (weight @ rooted) / root_singular[:, None, :]
    right = root_singular[:, :, None] * unrooted
    # left·right = W E F with E = L V_r, F = V_rᵀ L⁻¹ (an oblique projector E F).
    objective = _objective(rooted, unrooted, given_gram, near.matrix)
    left, right = balance_factors(left, right)
    return Truncation(
        left=left,
        right=right,
        objective=objective.cpu(),
        damping_input=whitened.near_damping,
        damping_output=whitened.far_damping,
        identity_input=near.zero(batch),
        identity_output=far.zero(batch),
    )


@dataclass
class _Whitened:
    """``Lᵀ (Wᵀ Q W + d_Q·WᵀW) L`` of a tall batch (symmetrised), with what built it."""

    matrix: torch.Tensor
    root: torch.Tensor | None
    given_gram: torch.Tensor
    near_damping: torch.Tensor
    far_damping: torch.Tensor


def _whitened_gram(weight: torch.Tensor, near: Moment, far: Moment, names: list[str]) -> _Whitened:
    """The small-side matrix whose eigenvalues are the squared singular values of ``L_Qᵀ W L_P``."""
    batch = weight.shape[0]
    plain_gram = weight.transpose(1, 2) @ weight
    given_gram = _far_gram(weight, far.matrix, plain_gram)
    used_far = far.used()
    gram = given_gram if used_far is far.matrix else _far_gram(weight, used_far, plain_gram)
    far_damping = torch.zeros(batch, dtype=torch.float64)
    if used_far is not None:
        gram = gram + far.damping * plain_gram
        far_damping = torch.full((batch,), float(far.damping), dtype=torch.float64)
    root, near_damping = _damped_root(near, near.used(), names)
    whitened = _times_root(_times_root(gram, root).transpose(1, 2), root)  # Lᵀ K L
    return _Whitened(
        matrix=(whitened + whitened.transpose(1, 2)) / 2,
        root=root,
        given_gram=given_gram,
        near_damping=near_damping,
        far_damping=far_damping,
    )


def kronecker_spectrum(
    weight: torch.Tensor, input_moment: Moment, output_moment: Moment, names: list[str]
) -> torch.Tensor:
    """Squared singular values of ``L_Gᵀ W L_A`` per layer, (b, min(out, in)), descending, float64,
    damped as :func:`kronecker_truncation`: its rank-r loss is the sum after the r-th."""
    weight = weight.double()
    if weight.shape[1] >= weight.shape[2]:
        whitened = _whitened_gram(weight, input_moment, output_moment, names)
    else:
        whitened = _whitened_gram(weight.mT, output_moment, input_moment, names)
    return batched_eigvalsh(whitened.matrix).flip(-1).clamp_min(0)


@dataclass
class Expansion:
    """A batch's truncation path: ``W = Σ_i left[:, :, i] right[:, :, i]ᵀ`` (b, out, k), (b, in, k),
    terms in the order the truncation drops them last (largest ``values`` first), so a rank-r
    solution keeps the first r terms."""

    values: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor


def kronecker_expansion(
    weight: torch.Tensor, input_moment: Moment, output_moment: Moment, names: list[str]
) -> Expansion:
    """:func:`kronecker_spectrum` with the rank-one terms of the solution: rank r keeps
    ``Σ_{i≤r} (W L v_i)(L⁻ᵀ v_i)ᵀ`` (tall layers; wide ones transposed), what
    :func:`kronecker_truncation` returns at every rank."""
    weight = weight.double()
    if weight.shape[1] >= weight.shape[2]:
        return _tall_expansion(weight, input_moment, output_moment, names)
    swapped = _tall_expansion(weight.mT, output_moment, input_moment, names)
    return Expansion(swapped.values, left=swapped.right, right=swapped.left)


def _tall_expansion(weight: torch.Tensor, near: Moment, far: Moment, names: list[str]) -> Expansion:
    whitened = _whitened_gram(weight, near, far, names)
    eigenvalues, eigenvectors = batched_eigh(whitened.matrix)
    vectors = eigenvectors.flip(-1)
    rooted = _times_root(vectors.transpose(1, 2), whitened.root, transpose=True).transpose(1, 2)
    unrooted = _solve_root(vectors.transpose(1, 2), whitened.root).transpose(1, 2)
    return Expansion(eigenvalues.flip(-1).clamp_min(0), left=weight @ rooted, right=unrooted)


def _far_gram(
    weight: torch.Tensor, moment: torch.Tensor | None, plain_gram: torch.Tensor
) -> torch.Tensor:
    """``Wᵀ Q W`` for the far-side moment ``Q`` (identity, dense or diagonal)."""
    if moment is None:
        return plain_gram
    if moment.ndim == 2:
        return weight.transpose(1, 2) @ (moment[:, :, None] * weight)
    return weight.transpose(1, 2) @ (moment @ weight)


def _damped_root(
    moment: Moment, used: torch.Tensor | None, names: list[str]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Lower Cholesky root (or √diagonal) of ``used + damping·I``; raised ×10 where it fails."""
    batch = len(names)
    if used is None:
        return None, torch.zeros(batch, dtype=torch.float64)
    damping = torch.full((batch,), float(moment.damping), dtype=torch.float64)
    if moment.diagonal:
        # Positive: ASVD's scale is floored relative to its mean, an all-zero one is the identity.
        return (used + damping.to(used.device)[:, None]).sqrt(), damping
    identity = torch.eye(used.shape[1], dtype=used.dtype, device=used.device)
    root = torch.empty_like(used)
    pending = torch.arange(batch)
    for _ in range(MAX_DAMPING_RAISES + 1):
        on_device = pending.to(used.device)
        damped = used[on_device] + damping[pending].to(used.device)[:, None, None] * identity
        factor, status = torch.linalg.cholesky_ex(damped)
        failed = (status != 0).cpu()
        root[on_device[~failed.to(used.device)]] = factor[~failed.to(used.device)]
        pending = pending[failed]
        if len(pending) == 0:
            return root, damping
        damping[pending] *= 10
    layer = names[int(pending[0])]
    raise ValueError(
        f"{moment.name} of layer {layer!r} is not positive semi-definite: its Cholesky factorization "
        f"failed even with damping {float(damping[pending[0]]) / 10:g} × its mean diagonal; "
        "expected a second moment Σ x xᵀ / T"
    )


def _times_root(
    matrix: torch.Tensor, root: torch.Tensor | None, transpose: bool = False
) -> torch.Tensor:
    """``matrix @ L`` (or ``matrix @ Lᵀ``) for a dense, diagonal or identity root ``L``."""
    if root is None:
        return matrix
    if root.ndim == 2:
        return matrix * root[:, None, :]
    return matrix @ (root.transpose(1, 2) if transpose else root)


def _solve_root(matrix: torch.Tensor, root: torch.Tensor | None) -> torch.Tensor:
    """``matrix @ L⁻¹`` by a triangular solve (no explicit inverse)."""
    if root is None:
        return matrix
    if root.ndim == 2:
        return matrix / root[:, None, :]
    return torch.linalg.solve_triangular(root, matrix, upper=False, left=False)


def _objective(
    rooted: torch.Tensor, unrooted: torch.Tensor, far_gram: torch.Tensor, near: torch.Tensor | None
) -> torch.Tensor:
    """``tr(ΔWᵀ Q ΔW P)`` for ΔW = W (I − E F), E = L V_r (n × r), F = V_rᵀ L⁻¹ (r × n), as
    tr(K P) − 2 tr(K E F P) + tr((Eᵀ K E)(F P Fᵀ)), K = Wᵀ Q W: thin products only (3·n²·r, not
    3·n³), losing ~1e-16·tr(K P) absolute."""
    far_rooted = far_gram @ rooted  # K E
    near_unrooted = unrooted if near is None else _times_near(unrooted, near)  # F P
    total = _trace_product(far_gram, near)
    cross = (far_rooted * near_unrooted.transpose(1, 2)).sum(dim=(1, 2))
    inner = (rooted.transpose(1, 2) @ far_rooted) * (near_unrooted @ unrooted.transpose(1, 2))
    return total - 2 * cross + inner.sum(dim=(1, 2))


def _times_near(matrix: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """``matrix @ P`` for a dense or diagonal ``P``."""
    return matrix * near[:, None, :] if near.ndim == 2 else matrix @ near


def _trace_product(gram: torch.Tensor, near: torch.Tensor | None) -> torch.Tensor:
    """``tr(K P)`` for symmetric ``K`` and ``P`` (identity, dense or diagonal)."""
    if near is None:
        return gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    if near.ndim == 2:
        return (gram.diagonal(dim1=1, dim2=2) * near).sum(dim=1)
    return (gram * near).sum(dim=(1, 2))
