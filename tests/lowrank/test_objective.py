"""The weighted objective, the budget → rank rule and input validation."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from weighted_lowrank.lowrank.objective import (
    STOP_REASONS,
    FactorizationResult,
    StopReason,
    rank_for_budget,
    validate_problem,
    weighted_loss,
)


def test_weighted_loss_matches_elementwise_sum_in_float64():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=generator)
    importance = torch.rand(7, 5, generator=generator)
    left = torch.randn(7, 2, generator=generator)
    right = torch.randn(2, 5, generator=generator)
    expected = 0.0
    for i in range(7):
        for j in range(5):
            approx = sum(float(left[i, k]) * float(right[k, j]) for k in range(2))
            expected += float(importance[i, j]) * (float(weight[i, j]) - approx) ** 2
    assert weighted_loss(weight, importance, left, right) == pytest.approx(expected, rel=1e-6)


def test_weighted_loss_without_importance_is_squared_frobenius_error():
    weight = torch.randn(6, 4, dtype=torch.float64)
    left, right = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = float((weight - left @ right).square().sum())
    assert weighted_loss(weight, None, left, right) == pytest.approx(expected, rel=1e-12)
    assert weighted_loss(weight, torch.ones_like(weight), left, right) == pytest.approx(
        expected, rel=1e-12
    )


def test_weighted_loss_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="does not give"):
        weighted_loss(torch.zeros(4, 3), None, torch.zeros(4, 2), torch.zeros(2, 5))


@pytest.mark.parametrize(
    ("shape", "fraction", "rank"),
    [((384, 384), 0.5, 96), ((1536, 384), 0.5, 153), ((384, 1536), 0.25, 76), ((10, 10), 1.0, 5)],
)
def test_rank_for_budget_keeps_the_fraction_of_parameters(shape, fraction, rank):
    assert rank_for_budget(shape, fraction) == rank
    out_features, in_features = shape
    assert rank * (out_features + in_features) <= fraction * out_features * in_features
    assert (rank + 1) * (out_features + in_features) > fraction * out_features * in_features


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), 0.001])
def test_rank_for_budget_rejects_fractions_without_a_valid_rank(fraction):
    with pytest.raises(ValueError, match="budget fraction"):
        rank_for_budget((64, 64), fraction)


@pytest.mark.parametrize(
    ("weight", "importance", "rank", "message"),
    [
        (torch.zeros(4), None, 1, "2-D"),
        (torch.zeros(2, 3, 4), None, 1, "2-D"),
        (torch.zeros(4, 3), torch.ones(3, 4), 1, "importance shape"),
        (torch.zeros(4, 3), torch.full((4, 3), float("nan")), 1, "NaN or inf"),
        (torch.zeros(4, 3), torch.full((4, 3), float("inf")), 1, "NaN or inf"),
        (torch.zeros(4, 3), -torch.ones(4, 3), 1, "negative"),
        (torch.zeros(4, 3), None, 0, "rank"),
        (torch.zeros(4, 3), None, 3, "rank"),
        (torch.zeros(4, 3), None, 1.5, "rank"),
        (torch.full((4, 3), float("nan")), None, 1, "weight contains NaN"),
        (torch.zeros(4, 3, dtype=torch.int64), None, 1, "floating-point"),
    ],
)
def test_validate_problem_names_the_problem(weight, importance, rank, message):
    with pytest.raises(ValueError, match=message):
        validate_problem(weight, importance, rank)


def test_zero_importance_entries_are_valid_and_do_not_count():
    weight = torch.arange(12.0).reshape(4, 3)
    importance = torch.ones(4, 3)
    importance[0] = 0
    validate_problem(weight, importance, 2)
    zero_left, zero_right = torch.zeros(4, 2), torch.zeros(2, 3)
    loss = weighted_loss(weight, importance, zero_left, zero_right)
    assert loss == pytest.approx(float(weight[1:].square().sum()))


def test_stop_reasons_list_exactly_the_stop_reason_literal():
    assert STOP_REASONS == typing.get_args(StopReason)
    assert set(STOP_REASONS) == {"converged", "max_iters", "max_seconds", "exact"}


def test_factorization_result_requires_a_stop_reason():
    stop_reason = {item.name: item for item in dataclasses.fields(FactorizationResult)}[
        "stop_reason"
    ]
    assert stop_reason.default is dataclasses.MISSING
    assert stop_reason.default_factory is dataclasses.MISSING
