"""LowRankLinear and the helpers that find and swap low-rank layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weighted_lowrank.lowrank.layer import (
    LowRankLinear,
    lowrank_modules,
    lowrank_ranks,
    replace_module,
)


def test_lowrank_linear_equals_its_dense_product():
    generator = torch.Generator().manual_seed(0)
    left, right, bias = (
        torch.randn(shape, generator=generator) for shape in [(7, 3), (3, 5), (7,)]
    )
    layer = LowRankLinear.from_factors(left, right, bias)
    inputs = torch.randn(2, 4, 5, generator=generator)
    expected = inputs @ (left @ right).T + bias
    torch.testing.assert_close(layer(inputs), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), left @ right)
    assert (layer.in_features, layer.out_features, layer.rank) == (5, 7, 3)
    assert not hasattr(layer, "weight")
    assert layer.bias is layer.left.bias
    assert sum(p.numel() for p in layer.parameters()) == 3 * (5 + 7) + 7
    assert set(layer.state_dict()) == {"right.weight", "left.weight", "left.bias"}
    no_bias = LowRankLinear.from_factors(left, right)
    torch.testing.assert_close(no_bias(inputs), inputs @ (left @ right).T, atol=1e-6, rtol=1e-5)


def test_lowrank_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, 0)
    with pytest.raises(ValueError, match="factors"):
        LowRankLinear.from_factors(torch.zeros(4, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_factors(torch.zeros(4, 2), torch.zeros(2, 4), torch.zeros(3))


def test_replace_module_swaps_by_dotted_name_and_the_finders_see_it():
    model = nn.Sequential(nn.Linear(6, 5), nn.Sequential(nn.ReLU(), nn.Linear(5, 4)))
    assert lowrank_modules(model) == {}
    inner = LowRankLinear(5, 4, 2)
    top = LowRankLinear(6, 5, 3, bias=False)
    replace_module(model, "1.1", inner)
    replace_module(model, "0", top)
    assert model[1][1] is inner and model[0] is top
    assert lowrank_modules(model) == {"0": top, "1.1": inner}
    assert lowrank_ranks(model) == {"0": 3, "1.1": 2}
    assert model(torch.zeros(2, 6)).shape == (2, 4)
