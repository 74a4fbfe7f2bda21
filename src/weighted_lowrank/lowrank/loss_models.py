"""Loss models: the quadratic each solver minimises, as a prediction of the task-loss increase.

Every solver of this project minimises an approximation of the second-order increase of the task
loss when a Linear layer's weight W (out × in) is replaced by its low-rank approximation,

    ΔL ≈ ½ vec(ΔW)ᵀ F vec(ΔW),   ΔW = W − AB,   vec row-major (``ΔW.flatten()``),

and differs only in the curvature F it assumes. With the per-example statistics of the layer —
the diagonal empirical Fisher divided by the N examples it sums over, Ī its mean entry; A and G
of :mod:`weighted_lowrank.lowrank.calibration` — the loss models are, in nats per example:

- ``identity``   F = Ī·𝟙: plain SVD's isotropic curvature, scaled so that its total (trace)
  equals the diagonal Fisher's — ½ Ī ‖ΔW‖²;
- ``fwsvd``      F = diag(vec(r cᵀ / S)) / N: two-sided FWSVD's rank-one fit of the Fisher
  (row sums r, column sums c, total S; same marginals, so the same trace) — ½ Σ r_i c_j ΔW²_ij / (S N);
- ``diagonal``   F = diag(vec(I)) / N: the element-wise solvers' — ½ Σ I ΔW² / N;
- ``kronecker``  F = G ⊗ A: K-FAC, kfwsvd's — ½ tr(ΔWᵀ G ΔW A) = ½ Σ (G ΔW) ⊙ (ΔW A);
- ``activation`` F = ḡ·𝟙_out ⊗ A with ḡ = tr(G)/out, the mean output-gradient second moment:
  svd_llm's (G = identity), scaled so that its trace equals the Kronecker model's —
  ½ ḡ tr(ΔW A ΔWᵀ).

Why these scales: ``identity`` and ``activation`` carry no unit of their own (SVD and SVD-LLM
minimise them up to a constant); the two above give each the trace of the model it simplifies,
so ``identity`` = ``diagonal`` exactly when the Fisher is uniform and ``activation`` =
``kronecker`` exactly when G is isotropic, and the ratios between loss models read as what the
simplification ignores. A rank correlation (Spearman) is unaffected by any scale.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: The :class:`LayerCurvature` fields each loss model needs, from the crudest curvature to the
#: richest.
REQUIRED_STATISTICS: dict[str, tuple[str, ...]] = {
    "identity": ("fisher",),
    "fwsvd": ("fisher",),
    "diagonal": ("fisher",),
    "kronecker": ("input_moment", "output_moment"),
    "activation": ("input_moment", "output_moment"),
}
#: Every loss model, in :data:`REQUIRED_STATISTICS` order.
LOSS_MODELS: tuple[str, ...] = tuple(REQUIRED_STATISTICS)


@dataclass(frozen=True)
class LayerCurvature:
    """One Linear layer's curvature statistics, each *per example*; ``None`` = not available.

    ``fisher``: the diagonal empirical Fisher divided by the number of examples it sums over
    (out × in); ``input_moment``: A (in × in); ``output_moment``: G (out × out).
    """

    fisher: torch.Tensor | None = None
    input_moment: torch.Tensor | None = None
    output_moment: torch.Tensor | None = None

    def missing(self, loss_model: str) -> tuple[str, ...]:
        """The statistics ``loss_model`` needs that this layer lacks (empty: it can be computed)."""
        if loss_model not in REQUIRED_STATISTICS:
            raise ValueError(f"unknown loss model {loss_model!r}; expected one of {LOSS_MODELS}")
        needed = REQUIRED_STATISTICS[loss_model]
        return tuple(name for name in needed if getattr(self, name) is None)

    def loss_models(self) -> tuple[str, ...]:
        """The loss models these statistics allow, in :data:`LOSS_MODELS` order."""
        return tuple(model for model in LOSS_MODELS if not self.missing(model))


def predicted_loss_increase(
    delta: torch.Tensor,
    curvature: LayerCurvature,
    loss_models: tuple[str, ...] | list[str] | None = None,
) -> dict[str, float]:
    """``{loss model: ½ vec(ΔW)ᵀ F vec(ΔW)}`` in nats per example (module docstring), in float64.

    ``delta`` is ΔW = W − AB (out × in). ``loss_models=None`` computes every model the statistics
    allow; naming one whose statistics are missing is a ``ValueError`` that names them.
    """
    if delta.ndim != 2:
        raise ValueError(f"ΔW must be 2-D (out, in), got shape {tuple(delta.shape)}")
    requested = curvature.loss_models() if loss_models is None else tuple(loss_models)
    lacking = {model: curvature.missing(model) for model in requested if curvature.missing(model)}
    if lacking:
        raise ValueError(
            f"loss models {list(lacking)} need statistics the layer lacks: "
            + ", ".join(f"{model} needs {list(names)}" for model, names in lacking.items())
        )
    delta = delta.detach().double()
    statistics = _checked_statistics(curvature, tuple(delta.shape))
    return {model: 0.5 * _QUADRATICS[model](delta, statistics) for model in requested}


def _checked_statistics(
    curvature: LayerCurvature, shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """The present statistics in float64 on ΔW's device, once their shapes fit ΔW's."""
    out_features, in_features = shape
    expected = {
        "fisher": (out_features, in_features),
        "input_moment": (in_features, in_features),
        "output_moment": (out_features, out_features),
    }
    statistics = {}
    for item in fields(curvature):
        value = getattr(curvature, item.name)
        if value is None:
            continue
        if tuple(value.shape) != expected[item.name]:
            raise ValueError(
                f"{item.name} has shape {tuple(value.shape)}; for ΔW of shape {shape} expected "
                f"{expected[item.name]}"
            )
        statistics[item.name] = value.detach().double()
    return statistics


def _identity(delta: torch.Tensor, statistics: dict[str, torch.Tensor]) -> float:
    return float(statistics["fisher"].mean() * delta.square().sum())


def _fwsvd(delta: torch.Tensor, statistics: dict[str, torch.Tensor]) -> float:
    fisher = statistics["fisher"]
    total = fisher.sum()
    if total == 0:
        return 0.0
    rows, columns = fisher.sum(dim=1), fisher.sum(dim=0)
    return float(rows @ delta.square() @ columns / total)


def _diagonal(delta: torch.Tensor, statistics: dict[str, torch.Tensor]) -> float:
    return float((statistics["fisher"] * delta.square()).sum())


def _kronecker(delta: torch.Tensor, statistics: dict[str, torch.Tensor]) -> float:
    return float(
        ((statistics["output_moment"] @ delta) * (delta @ statistics["input_moment"])).sum()
    )


def _activation(delta: torch.Tensor, statistics: dict[str, torch.Tensor]) -> float:
    mean_output_moment = statistics["output_moment"].diagonal().mean()
    return float(mean_output_moment * (delta * (delta @ statistics["input_moment"])).sum())


_QUADRATICS = {
    "identity": _identity,
    "fwsvd": _fwsvd,
    "diagonal": _diagonal,
    "kronecker": _kronecker,
    "activation": _activation,
}
