"""The low-rank replacement of ``nn.Linear`` and the helpers that find and swap such layers.

A compressed layer ``m`` computes ``left(right(x))`` for the factors ``W ≈ A·B`` (``left`` = A,
``right`` = B), stored as ``m.right.weight``, ``m.left.weight`` and ``m.left.bias``.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` computing ``left(right(x))`` with a rank bottleneck;
    no ``weight`` (the product is :meth:`dense_weight`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("rank", rank),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LowRankLinear {name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.right = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.left = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build the layer ``x ↦ x·rightᵀ·leftᵀ + bias`` from ``left`` (out × r) and ``right`` (r × in)."""
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(
                f"factors must be left (out, r) and right (r, in); got {tuple(left.shape)} and "
                f"{tuple(right.shape)}"
            )
        out_features, rank = left.shape
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(
            right.shape[1],
            out_features,
            rank,
            bias=bias is not None,
            device=left.device,
            dtype=left.dtype,
        )
        with torch.no_grad():
            layer.left.weight.copy_(left)
            layer.right.weight.copy_(right)
            if bias is not None:
                layer.left.bias.copy_(bias)
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        """The output bias, as on ``nn.Linear``."""
        return self.left.bias

    def dense_weight(self) -> torch.Tensor:
        """The (out × in) matrix ``left.weight @ right.weight`` this layer applies."""
        return self.left.weight @ self.right.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(input))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.left.bias is not None}"
        )


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """``{module name: LowRankLinear}`` of a model, in model order."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)
    }


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    """``{module name: rank}`` of a model's :class:`LowRankLinear` layers, in model order."""
    return {name: module.rank for name, module in lowrank_modules(model).items()}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule ``name`` (dotted path), in place."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)
