"""Loss models: the quadratic each solver minimises, ΔL ≈ ½ vec(ΔW)ᵀ F vec(ΔW) for ΔW = W − AB
(vec row-major), as a prediction of the task-loss increase in nats per example. With Ī the mean
of the per-example diagonal Fisher I / N, and A, G of :mod:`weighted_lowrank.lowrank.calibration`:

- ``identity``   (svd) F = Ī·𝟙 — ½ Ī ‖ΔW‖²;
- ``fwsvd``      (two-sided FWSVD, row/column sums r, c, total S) — ½ Σ r_i c_j ΔW²_ij / (S N);
- ``diagonal``   (element-wise solvers) F = diag(vec(I)) / N — ½ Σ I ΔW² / N;
- ``kronecker``  (kfwsvd, K-FAC) F = G ⊗ A — ½ tr(ΔWᵀ G ΔW A) = ½ Σ (G ΔW) ⊙ (ΔW A);
- ``activation`` (svd_llm) F = ḡ·𝟙_out ⊗ A, ḡ = tr(G)/out — ½ ḡ tr(ΔW A ΔWᵀ).

``identity`` and ``activation`` are scaled to the trace of the model they simplify, so ratios
between loss models say what each simplification ignores (docs/METHOD.md "Loss models").
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: The :class:`LayerCurvature` fields each loss model needs, crudest curvature first.
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
    """One layer's per-example diagonal Fisher, A and G (``None``: not available)."""

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
    """``{loss model: ½ vec(ΔW)ᵀ F vec(ΔW)}`` in nats per example (float64)."""
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
