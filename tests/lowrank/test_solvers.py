"""Weighted low-rank solvers: optimality of the closed forms, properties of the iterative ones."""

from __future__ import annotations

import pytest
import torch

from weighted_lowrank.lowrank.objective import weighted_loss
from weighted_lowrank.lowrank.solvers import SOLVERS, factorize, factorize_batch


def _problem(out_features=24, in_features=16, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    importance = torch.rand(out_features, in_features, generator=generator, dtype=dtype) ** 4
    return weight, importance


def _trailing_energy(matrix: torch.Tensor, rank: int) -> float:
    singular = torch.linalg.svdvals(matrix.double())
    return float(singular[rank:].square().sum())


def test_svd_reaches_the_eckart_young_optimum():
    weight, _ = _problem()
    result = factorize(weight, None, 5, solver="svd")
    assert result.left.shape == (24, 5) and result.right.shape == (5, 16)
    assert result.loss == pytest.approx(_trailing_energy(weight, 5), rel=1e-10)
    assert result.loss == pytest.approx(
        weighted_loss(weight, None, result.left, result.right), rel=1e-12
    )
    assert result.solver == "svd" and result.rank == 5 and result.history


def test_svd_loss_under_an_importance_is_weighted():
    weight, importance = _problem()
    result = factorize(weight, importance, 5, solver="svd")
    assert result.loss == pytest.approx(
        weighted_loss(weight, importance, result.left, result.right)
    )


@pytest.mark.parametrize("axis", ["in", "out", "both"])
def test_fwsvd_is_exact_when_the_importance_matches_its_axis(axis):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    rows = torch.rand(20, generator=generator, dtype=torch.float64) + 0.1
    cols = torch.rand(12, generator=generator, dtype=torch.float64) + 0.1
    if axis == "in":
        rows = torch.ones_like(rows)
    if axis == "out":
        cols = torch.ones_like(cols)
    importance = rows[:, None] * cols[None, :]
    result = factorize(weight, importance, 4, solver="fwsvd", axis=axis)
    optimum = _trailing_energy(rows.sqrt()[:, None] * weight * cols.sqrt()[None, :], 4)
    assert result.loss == pytest.approx(optimum, rel=1e-9)
    assert result.info == {"axis": axis}


def test_fwsvd_default_axis_is_two_sided_and_beats_svd_on_separable_importance():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    importance = (
        torch.outer(
            torch.rand(16, generator=generator), torch.rand(16, generator=generator)
        ).double()
        ** 2
    )
    two_sided = factorize(weight, importance, 3, solver="fwsvd")
    assert two_sided.info["axis"] == "both"
    for other in (
        factorize(weight, importance, 3, solver="svd"),
        factorize(weight, importance, 3, solver="fwsvd", axis="in"),
        factorize(weight, importance, 3, solver="fwsvd", axis="out"),
    ):
        assert two_sided.loss <= other.loss * (1 + 1e-12)


def test_fwsvd_handles_rows_and_columns_of_zero_importance():
    weight, importance = _problem()
    importance[3] = 0
    importance[:, 5] = 0
    for axis in ("in", "out", "both"):
        result = factorize(weight, importance, 4, solver="fwsvd", axis=axis)
        assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()
        assert result.loss < weighted_loss(
            weight, importance, torch.zeros(24, 4), torch.zeros(4, 16)
        )


def test_closed_forms_keep_dtype_and_device_of_the_weight():
    weight = torch.randn(12, 10)
    result = factorize(weight, torch.rand(12, 10), 3, solver="fwsvd", device="cpu")
    assert result.left.dtype == torch.float32 and result.left.device == weight.device


def test_factorize_batch_equals_per_layer_calls_for_closed_forms():
    problems = [_problem(24, 16, seed) for seed in range(3)] + [_problem(16, 24, 9)]
    weights = [w for w, _ in problems]
    importances = [imp for _, imp in problems]
    importances[1] = None
    ranks = [5, 5, 4, 5]
    batched = factorize_batch(weights, importances, ranks, solver="fwsvd", axis="in")
    for weight, importance, rank, result in zip(weights, importances, ranks, batched, strict=True):
        single = factorize(weight, importance, rank, solver="fwsvd", axis="in")
        assert result.rank == rank
        assert result.loss == pytest.approx(single.loss, rel=1e-9)
        torch.testing.assert_close(result.left @ result.right, single.left @ single.right)


def test_registry_lists_every_required_solver():
    for name in ("svd", "fwsvd"):
        assert name in SOLVERS


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, i: factorize(w, i, 3, solver="nope"), "unknown solver"),
        (lambda w, i: factorize(w, i, 3, solver="svd", learning_rate=1.0), "unknown option"),
        (lambda w, i: factorize(w, i, 3, solver="fwsvd", axis="rows"), "axis"),
        (lambda w, i: factorize(w[0], i, 3, solver="svd"), "2-D"),
        (lambda w, i: factorize(w, i[:, :3], 3, solver="svd"), "importance shape"),
        (lambda w, i: factorize(w, -i, 3, solver="fwsvd"), "negative"),
        (lambda w, i: factorize(w, i * float("nan"), 3, solver="fwsvd"), "NaN"),
        (lambda w, i: factorize(w, i, 0, solver="svd"), "rank"),
        (lambda w, i: factorize(w, i, 16, solver="svd"), "rank"),
        (lambda w, i: factorize_batch([w, w], [i], [3, 3], solver="svd"), "equal lengths"),
        (lambda w, i: factorize_batch([w, w[:, :4]], [i, i], [3, 3], solver="svd"), "layer 1"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    weight, importance = _problem()
    with pytest.raises(ValueError, match=message):
        call(weight, importance)
