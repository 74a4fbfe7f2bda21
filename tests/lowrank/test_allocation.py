"""Global rank allocation: the dynamic programme against brute force, budgets, ties and errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from weighted_lowrank.lowrank.allocation import (
    Allocation,
    LossCurve,
    allocate_ranks,
    max_rank,
    parameter_budget,
    uniform_ranks,
)
from weighted_lowrank.lowrank.objective import rank_for_budget


def _curve(shape: tuple[int, int], losses) -> LossCurve:
    return LossCurve(shape[0], shape[1], np.asarray(losses, dtype=np.float64))


def _loss(curve: LossCurve, rank: int | None) -> float:
    return 0.0 if rank is None else float(curve.losses[rank - 1])


def _check_consistent(allocation: Allocation, curves: dict[str, LossCurve]) -> None:
    """The reported totals are those of the reported ranks, and the budget holds."""
    assert list(allocation.ranks) == list(curves)
    kept = sum(curves[name].parameters(rank) for name, rank in allocation.ranks.items())
    assert allocation.parameters == kept <= allocation.max_parameters
    predicted = math.fsum(_loss(curves[name], rank) for name, rank in allocation.ranks.items())
    assert allocation.predicted_loss == predicted


def _brute_force(curves: dict[str, LossCurve], max_parameters: int) -> float:
    """The least summed loss over every combination of candidates within ``max_parameters``."""
    options = [[*range(1, curve.max_rank + 1), None] for curve in curves.values()]
    best = math.inf
    for combination in itertools.product(*options):
        chosen = list(zip(curves.values(), combination, strict=True))
        if sum(curve.parameters(r) for curve, r in chosen) <= max_parameters:
            best = min(best, sum(_loss(curve, r) for curve, r in chosen))
    return best


def _combination_costs(curves: dict[str, LossCurve]) -> list[int]:
    options = [
        [curve.parameters(r) for r in [*range(1, curve.max_rank + 1), None]]
        for curve in curves.values()
    ]
    return sorted({sum(costs) for costs in itertools.product(*options)})


SMALL_SHAPES = [(6, 4), (5, 5), (8, 3), (3, 7), (10, 8), (12, 9), (2, 1)]


def _random_instance(rng: np.random.Generator) -> dict[str, LossCurve]:
    """3–4 small layers, some of one shape (equal costs), curves of every kind."""
    count = int(rng.integers(3, 5))
    shapes = [SMALL_SHAPES[int(i)] for i in rng.integers(0, len(SMALL_SHAPES), size=count)]
    if rng.random() < 0.5:
        shapes[-1] = shapes[0]  # equal costs across layers
    curves = {}
    for index, shape in enumerate(shapes):
        length = max_rank(*shape)
        kind = index % 4
        if kind == 0:  # non-monotone, non-convex noise
            losses = rng.random(length) * rng.uniform(0.1, 10)
        elif kind == 1:  # decreasing but non-convex: a staircase
            losses = np.sort(rng.random(length))[::-1]
            losses[1::2] = losses[::2][: len(losses[1::2])]
        elif kind == 2:  # coarse values: many ties
            losses = np.round(rng.random(length), 1)
        else:  # convex decreasing
            losses = (1 - np.arange(1, length + 1) / (length + 1)) ** 2 * rng.uniform(0.1, 5)
        curves[f"layer{index}"] = _curve(shape, losses)
    return curves


@pytest.mark.parametrize("seed", range(12))
def test_the_programme_finds_the_brute_force_optimum_at_every_budget(seed):
    rng = np.random.default_rng(seed)
    curves = _random_instance(rng)
    costs = _combination_costs(curves)
    # Every combination cost is an exact boundary; some are tested, with their neighbours.
    boundaries = [costs[0], costs[-1], *rng.choice(costs, size=min(6, len(costs)), replace=False)]
    budgets = sorted({int(b) + d for b in boundaries for d in (-1, 0, 1)} - {costs[0] - 1})
    for max_parameters in budgets:
        allocation = allocate_ranks(curves, max_parameters)
        _check_consistent(allocation, curves)
        assert allocation.exact
        assert allocation.predicted_loss == pytest.approx(
            _brute_force(curves, max_parameters), rel=1e-12, abs=1e-12
        )


def test_boundary_budget_reaches_the_combination_that_costs_exactly_it():
    curves = {"a": _curve((6, 4), [5.0, 4.0]), "b": _curve((5, 5), [3.0, 1.0])}
    # a at rank 1 (10) + b at rank 2 (20) = 30: loss 6; one parameter less only allows loss 8.
    assert allocate_ranks(curves, 30).ranks == {"a": 1, "b": 2}
    assert allocate_ranks(curves, 30).predicted_loss == 6.0
    assert allocate_ranks(curves, 29).predicted_loss == 8.0
    assert allocate_ranks(curves, 29).parameters == 20


def test_max_rank_is_the_last_rank_that_saves_parameters():
    assert max_rank(384, 384) == 191  # 191·768 < 384² = 192·768
    assert max_rank(1536, 384) == 307
    assert max_rank(6, 4) == 2
    assert max_rank(1, 1) == max_rank(2, 1) == max_rank(2, 2) == 0
    curve = _curve((6, 4), [1.0, 0.5])
    assert [curve.parameters(r) for r in (1, 2, None)] == [10, 20, 24]
    with pytest.raises(ValueError, match=r"rank 3 is no candidate.*expected 1\.\.2 or None"):
        curve.parameters(3)
    with pytest.raises(ValueError, match="read-only"):
        curve.losses[0] = 0.0


def test_uniform_ranks_are_todays_rule_and_define_the_parameter_budget():
    shapes = {"q": (384, 384), "up": (1536, 384), "down": (384, 1536), "odd": (33, 17)}
    for budget in (0.1, 0.3, 0.5, 0.9):
        ranks = uniform_ranks(shapes, budget)
        assert ranks == {name: rank_for_budget(shape, budget) for name, shape in shapes.items()}
        assert parameter_budget(shapes, budget) == sum(
            ranks[name] * (out + inp) for name, (out, inp) in shapes.items()
        )
    with pytest.raises(ValueError, match=r"rank 0 for layer 'b' \(32x32\).*at least 0\.0625"):
        uniform_ranks({"a": (32, 128), "b": (32, 32)}, 0.05)
    with pytest.raises(ValueError, match=r"rank 1 for layer 'c' \(2x2\) keeps 4 parameters"):
        uniform_ranks({"c": (2, 2)}, 1.0)


def _minilm_shapes() -> dict[str, tuple[int, int]]:
    shapes = {}
    for block in range(6):
        for name in ("query", "key", "value", "attention.output"):
            shapes[f"layer.{block}.{name}"] = (384, 384)
        shapes[f"layer.{block}.intermediate"] = (1536, 384)
        shapes[f"layer.{block}.output"] = (384, 1536)
    return shapes


def test_global_allocation_is_never_worse_than_uniform_at_the_same_budget():
    """Every layer loses the same function of its kept fraction, weighted by its sensitivity."""
    shapes = _minilm_shapes()
    rng = np.random.default_rng(0)
    curves = {}
    for name, (out, inp) in shapes.items():
        kept = np.arange(1, max_rank(out, inp) + 1) * (out + inp) / (out * inp)
        curves[name] = _curve((out, inp), rng.uniform(0.1, 10) * (1 - kept) ** 3)
    for budget in (0.2, 0.3, 0.5):
        max_parameters = parameter_budget(shapes, budget)
        allocation = allocate_ranks(curves, max_parameters)
        _check_consistent(allocation, curves)
        assert allocation.exact and allocation.quantum == 384
        uniform = uniform_ranks(shapes, budget)
        uniform_loss = math.fsum(_loss(curves[name], rank) for name, rank in uniform.items())
        # Strictly better here: the sensitivities differ by up to 100×.
        assert allocation.predicted_loss < uniform_loss


def test_equal_layers_with_one_strictly_convex_curve_get_the_uniform_ranks():
    shapes = {f"l{i}": (16, 16) for i in range(4)}
    losses = (1 - np.arange(1, max_rank(16, 16) + 1) / 8) ** 2
    curves = {name: _curve(shape, losses) for name, shape in shapes.items()}
    for budget in (0.2, 0.5, 0.8):
        allocation = allocate_ranks(curves, parameter_budget(shapes, budget))
        assert allocation.ranks == uniform_ranks(shapes, budget)


def test_flat_curve_gets_rank_one_and_steep_curves_keep_more_rank():
    shape = (32, 32)
    ranks = np.arange(1, max_rank(*shape) + 1)
    decay = (1 - ranks / (max_rank(*shape) + 1)) ** 2
    curves = {
        "flat": _curve(shape, np.zeros(len(ranks))),
        "shallow": _curve(shape, 0.1 * decay),
        "steep": _curve(shape, 10.0 * decay),
    }
    allocation = allocate_ranks(curves, 15 * 64)  # no room for dense (16 × 64)
    _check_consistent(allocation, curves)
    assert allocation.ranks["flat"] == 1
    assert allocation.ranks["steep"] > allocation.ranks["shallow"] >= 1
    # A flat curve alone: its lowest rank even when the budget would allow dense.
    alone = allocate_ranks({"flat": curves["flat"]}, 32 * 32)
    assert alone.ranks == {"flat": 1} and alone.parameters == 64


def test_dense_is_chosen_when_it_is_worth_it():
    curves = {
        "fragile": _curve((6, 4), [1e6, 1e6]),
        "robust": _curve((8, 3), [0.5, 0.1]),
        "tiny": _curve((2, 1), []),  # no rank saves parameters: dense only
    }
    allocation = allocate_ranks(curves, 24 + 11 + 2)
    _check_consistent(allocation, curves)
    assert allocation.ranks == {"fragile": None, "robust": 1, "tiny": None}
    assert allocation.predicted_loss == 0.5
    # Without room for dense, the fragile layer takes its cheapest rank.
    assert allocate_ranks(curves, 24 + 11 + 1).ranks["fragile"] == 1


def test_budget_below_the_smallest_model_is_rejected_with_both_numbers():
    curves = {"a": _curve((6, 4), [1.0, 0.5]), "b": _curve((2, 1), [])}
    with pytest.raises(
        ValueError, match=r"max_parameters=11 is below the smallest model, 12 parameters.*raise"
    ):
        allocate_ranks(curves, 11)
    assert allocate_ranks(curves, 12).ranks == {"a": 1, "b": None}


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ([1.0, math.nan], r"layer 'b' \(5x5\) predicts loss nan at rank 2; expected a finite"),
        ([1.0, math.inf], r"layer 'b' \(5x5\) predicts loss inf at rank 2"),
        ([-0.5, -1.0], r"layer 'b' \(5x5\) predicts loss -0\.5 at rank 1; expected .*>= 0"),
        ([1.0, 0.5, 0.1], r"layer 'b' \(5x5\) has a loss curve of length 3; expected 2"),
        ([1.0], r"layer 'b' \(5x5\) has a loss curve of length 1; expected 2"),
    ],
)
def test_bad_curves_are_rejected_naming_layer_and_rank(losses, message):
    curves = {"a": _curve((6, 4), [1.0, 0.5]), "b": _curve((5, 5), losses)}
    with pytest.raises(ValueError, match=message):
        allocate_ranks(curves, 1000)


@pytest.mark.parametrize("max_parameters", [0, -5, 12.0, True, "100", None])
def test_max_parameters_must_be_a_positive_int(max_parameters):
    with pytest.raises(ValueError, match="max_parameters must be a positive int"):
        allocate_ranks({"a": _curve((6, 4), [1.0, 0.5])}, max_parameters)


def test_empty_curves_and_malformed_curves_are_rejected():
    with pytest.raises(ValueError, match="non-empty mapping"):
        allocate_ranks({}, 100)
    with pytest.raises(ValueError, match=r"layer 'a' has a list; expected a LossCurve"):
        allocate_ranks({"a": [1.0, 0.5]}, 100)
    with pytest.raises(ValueError, match="two positive int sizes"):
        LossCurve(0, 4, np.zeros(0))
    with pytest.raises(ValueError, match="1-D"):
        LossCurve(6, 4, np.zeros((2, 1)))


def _capacity(curves: dict[str, LossCurve], max_parameters: int, quantum: int) -> int:
    """Quanta of the table: the budget's, capped at every layer dense (costs rounded up)."""
    dense = sum(-(-curve.parameters(None) // quantum) for curve in curves.values())
    return min(max_parameters // quantum, dense)


def test_coarsened_table_stays_within_budget_and_is_flagged_inexact():
    rng = np.random.default_rng(3)
    shapes = [(40, 24), (36, 20), (33, 17), (40, 24)]
    curves = {f"l{i}": _curve(s, rng.random(max_rank(*s)) * 3) for i, s in enumerate(shapes)}
    smallest = sum(curve.parameters(1) for curve in curves.values())
    for max_parameters in (smallest + 200, smallest + 777, 2000, 3001):
        exact = allocate_ranks(curves, max_parameters)
        assert exact.exact and exact.quantum == 1
        coarse = allocate_ranks(curves, max_parameters, max_states=4 * 60)
        _check_consistent(coarse, curves)
        assert not coarse.exact and coarse.quantum > 1
        assert coarse.predicted_loss >= exact.predicted_loss
        # The smallest quantum (the gcd of the costs is 1) whose table fits 4 × 60 entries.
        assert _capacity(curves, max_parameters, coarse.quantum) + 1 <= 60
        assert _capacity(curves, max_parameters, coarse.quantum - 1) + 1 > 60


def test_max_states_too_small_for_the_smallest_model_is_rejected():
    curves = {name: _curve((6, 4), [1.0, 0.5]) for name in "abc"}
    assert allocate_ranks(curves, 30, max_states=48).exact  # quantum 2: 16 capacities × 3
    with pytest.raises(ValueError, match=r"max_states=30 coarsens the parameter quantum to 4"):
        allocate_ranks(curves, 30, max_states=30)
    with pytest.raises(ValueError, match="max_states=2 is fewer than the 3 layers"):
        allocate_ranks(curves, 30, max_states=2)


def test_same_inputs_give_the_same_allocation():
    rng = np.random.default_rng(7)
    curves = _random_instance(rng)
    budget = _combination_costs(curves)[len(_combination_costs(curves)) // 2]
    assert allocate_ranks(curves, budget) == allocate_ranks(dict(curves), budget)
