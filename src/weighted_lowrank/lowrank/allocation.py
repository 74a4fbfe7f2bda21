"""Global rank allocation: one parameter budget for all layers, spent where it lowers the loss most.

:func:`allocate_ranks` chooses per layer (out × in) a rank r ∈ 1..:func:`max_rank` costing
r·(out+in) parameters, or dense (rank ``None``, out·in parameters, loss 0), minimising the summed
predicted loss within :func:`parameter_budget` (what :func:`uniform_ranks` keep, so uniform is
always feasible), by a dynamic programme over parameter quanta, exact for any curves (measured
ones are neither convex nor monotone); ties go to the lowest rank. Above ``max_states`` entries
the quantum is coarsened (``Allocation.exact`` is ``False``). docs/METHOD.md "The programme".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np

from weighted_lowrank.lowrank.objective import rank_for_budget


def max_rank(out_features: int, in_features: int) -> int:
    """The largest rank r with r·(out+in) < out·in (0: the layer can only stay dense)."""
    return (out_features * in_features - 1) // (out_features + in_features)


@dataclass(frozen=True, eq=False)
class LossCurve:
    """One layer's predicted loss increase (nats), ``losses[r - 1]`` at rank r = 1..max_rank,
    stored read-only so a checked curve stays checked (:func:`check_curves` names the layer).
    Equality is identity: element-wise array equality has no single truth value."""

    out_features: int
    in_features: int
    losses: np.ndarray

    def __post_init__(self) -> None:
        _checked_shape((self.out_features, self.in_features), "LossCurve")
        losses = np.array(self.losses, dtype=np.float64, copy=True)
        if losses.ndim != 1:
            raise ValueError(
                f"losses must be 1-D (one loss per rank 1..max_rank), got shape {losses.shape}"
            )
        losses.setflags(write=False)
        object.__setattr__(self, "out_features", int(self.out_features))
        object.__setattr__(self, "in_features", int(self.in_features))
        object.__setattr__(self, "losses", losses)

    @property
    def max_rank(self) -> int:
        return max_rank(self.out_features, self.in_features)

    def parameters(self, rank: int | None) -> int:
        """Weight parameters the layer keeps at ``rank`` (``None``: dense, out·in)."""
        if rank is None:
            return self.out_features * self.in_features
        if not _is_positive_int(rank) or rank > self.max_rank:
            raise ValueError(
                f"rank {rank!r} is no candidate for a {self.out_features}x{self.in_features} "
                f"layer; expected 1..{self.max_rank} or None (dense)"
            )
        return int(rank) * (self.out_features + self.in_features)


@dataclass(frozen=True)
class Allocation:
    """The chosen rank per layer (``None``: dense), what it keeps and predicts."""

    ranks: dict[str, int | None]
    parameters: int
    max_parameters: int
    predicted_loss: float
    quantum: int
    exact: bool


def check_curves(curves: Mapping[str, LossCurve]) -> None:
    """``ValueError`` naming the first layer whose curve is not one finite loss ≥ 0 per rank (a
    negative or NaN loss would make a compressed layer look better than dense)."""
    for name, curve in curves.items():
        if not isinstance(curve, LossCurve):
            raise ValueError(f"layer {name!r} has a {type(curve).__name__}; expected a LossCurve")
        expected = curve.max_rank
        shape = f"{curve.out_features}x{curve.in_features}"
        if len(curve.losses) != expected:
            raise ValueError(
                f"layer {name!r} ({shape}) has a loss curve of length {len(curve.losses)}; "
                f"expected {expected}, one loss per rank 1..{expected} (the ranks that save "
                "parameters)"
            )
        bad = np.flatnonzero(~np.isfinite(curve.losses) | (curve.losses < 0))
        if bad.size:
            rank = int(bad[0]) + 1
            raise ValueError(
                f"layer {name!r} ({shape}) predicts loss {float(curve.losses[rank - 1])!r} at "
                f"rank {rank}; expected a finite loss >= 0 nats at every rank"
            )


def uniform_ranks(shapes: Mapping[str, tuple[int, int]], budget: float) -> dict[str, int]:
    """``{layer: rank_for_budget}``; a layer left at rank 0 or saving nothing is an error."""
    ranks = {}
    for name, shape in shapes.items():
        out_features, in_features = _checked_shape(shape, f"layer {name!r}")
        dense = out_features * in_features
        smallest = (out_features + in_features) / dense
        try:
            rank = rank_for_budget((out_features, in_features), budget)
        except ValueError as exc:
            raise ValueError(
                f"budget {budget} gives rank 0 for layer {name!r} ({out_features}x{in_features}): {exc}; "
                f"expected a budget of at least {smallest:.4g} so that every targeted layer keeps rank 1"
            ) from exc
        if rank * (out_features + in_features) >= dense:
            raise ValueError(
                f"rank {rank} for layer {name!r} ({out_features}x{in_features}) keeps "
                f"{rank * (out_features + in_features)} parameters, not fewer than the dense {dense}; "
                "expected a budget that saves parameters in every layer"
            )
        ranks[name] = rank
    return ranks


def parameter_budget(shapes: Mapping[str, tuple[int, int]], budget: float) -> int:
    """Σ r·(out+in) over the :func:`uniform_ranks`: uniform is always feasible."""
    ranks = uniform_ranks(shapes, budget)
    return sum(rank * (int(shapes[name][0]) + int(shapes[name][1])) for name, rank in ranks.items())


def allocate_ranks(
    curves: Mapping[str, LossCurve], max_parameters: int, *, max_states: int = 50_000_000
) -> Allocation:
    """The ranks minimising Σ predicted loss with Σ kept parameters ≤ ``max_parameters``."""
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(
            f"curves must be a non-empty mapping {{layer name: LossCurve}}, got {curves!r}"
        )
    _check_positive_int(max_parameters, "max_parameters", "parameters the layers may keep")
    _check_positive_int(max_states, "max_states", "dynamic-programme table entries")
    check_curves(curves)
    names = list(curves)
    layers = [curves[name] for name in names]
    # Candidate k of a layer: rank k + 1 for k < max_rank, then dense.
    costs = [_candidate_costs(curve) for curve in layers]
    smallest = sum(int(cost[0]) for cost in costs)
    if smallest > max_parameters:
        raise ValueError(
            f"max_parameters={max_parameters} is below the smallest model, {smallest} parameters "
            "(every layer at rank 1, dense where no rank saves parameters); expected "
            f"max_parameters >= {smallest}: raise the budget"
        )
    if max_states < len(layers):
        raise ValueError(
            f"max_states={max_states} is fewer than the {len(layers)} layers; expected at least "
            "one table entry per layer"
        )
    gcd = reduce(math.gcd, (_cost_gcd(curve) for curve in layers))
    quantum = _quantum(costs, max_parameters, max_states, gcd)
    units = [-(-cost // quantum) for cost in costs]  # rounded up: never under-counts parameters
    capacity = _capacity(costs, max_parameters, quantum)
    if sum(int(unit[0]) for unit in units) > capacity:
        raise ValueError(
            f"max_states={max_states} coarsens the parameter quantum to {quantum}, at which the "
            f"smallest model ({smallest} parameters) no longer fits in max_parameters="
            f"{max_parameters}; expected a larger max_states"
        )
    choices = _programme(units, [np.append(curve.losses, 0.0) for curve in layers], capacity)
    chosen = _read_back(choices, units, [curve.max_rank for curve in layers], capacity)
    ranks = dict(zip(names, chosen, strict=True))
    return Allocation(
        ranks=ranks,
        parameters=sum(curve.parameters(rank) for curve, rank in zip(layers, chosen, strict=True)),
        max_parameters=int(max_parameters),
        predicted_loss=math.fsum(
            0.0 if rank is None else float(curve.losses[rank - 1])
            for curve, rank in zip(layers, chosen, strict=True)
        ),
        quantum=quantum,
        exact=quantum == gcd,
    )


def _read_back(
    choices: list[Any], units: list[np.ndarray], max_ranks: list[int], capacity: int
) -> list[int | None]:
    """Each layer's rank (``None``: dense), walking the choices back from the last layer."""
    ranks: list[int | None] = [None] * len(choices)
    remaining = capacity
    for index in reversed(range(len(choices))):
        k = int(choices[index][remaining])
        remaining -= int(units[index][k])
        ranks[index] = None if k == max_ranks[index] else k + 1
    return ranks


def _programme(units: list[np.ndarray], losses: list[np.ndarray], capacity: int) -> list[Any]:
    """Per layer, the argmin candidate at every capacity 0..C of the min-plus knapsack."""
    size = capacity + 1
    best = np.zeros(size)
    index_dtype = (
        np.int16 if max(len(unit) for unit in units) <= np.iinfo(np.int16).max else np.int32
    )
    buffer = np.empty(size)
    better = np.empty(size, dtype=bool)
    choices = []
    # ``best`` is inf below the cheapest cost of the layers so far: no work there.
    floor = 0
    for unit, loss in zip(units, losses, strict=True):
        new = np.full(size, np.inf)
        choice = np.zeros(size, dtype=index_dtype)
        for k in range(len(unit)):
            start = floor + int(unit[k])
            if start >= size:
                break  # costs are non-decreasing in k
            length = size - start
            candidate = np.add(best[floor : floor + length], loss[k], out=buffer[:length])
            mask = np.less(candidate, new[start:], out=better[:length])
            np.copyto(new[start:], candidate, where=mask)
            np.copyto(choice[start:], k, where=mask)
        floor += int(unit[0])
        best = new
        choices.append(choice)
    return choices


def _candidate_costs(curve: LossCurve) -> np.ndarray:
    """Parameters of rank 1..max_rank, then dense: non-decreasing, int64."""
    ranks = np.arange(1, curve.max_rank + 1, dtype=np.int64)
    return np.append(ranks * (curve.out_features + curve.in_features), curve.parameters(None))


def _cost_gcd(curve: LossCurve) -> int:
    dense = curve.out_features * curve.in_features
    return math.gcd(curve.out_features + curve.in_features, dense) if curve.max_rank else dense


def _capacity(costs: list[np.ndarray], max_parameters: int, quantum: int) -> int:
    """``max_parameters // quantum``, capped at every layer dense (changes no optimum)."""
    densest = sum(-(-int(cost[-1]) // quantum) for cost in costs)
    return min(max_parameters // quantum, densest)


def _quantum(costs: list[np.ndarray], max_parameters: int, max_states: int, gcd: int) -> int:
    """``gcd``, or its smallest multiple whose table (capacity + 1) × layers fits ``max_states``."""
    slots = max_states // len(costs)

    def fits(multiple: int) -> bool:
        return _capacity(costs, max_parameters, multiple * gcd) + 1 <= slots

    if fits(1):
        return gcd
    # At q > max_parameters / slots, max_parameters // q <= slots − 1: an upper bound that fits.
    low, high = 1, -(-(max_parameters // slots + 1) // gcd)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high * gcd


def _checked_shape(shape: Any, what: str) -> tuple[int, int]:
    """``(out, in)`` as two positive ints, or ``ValueError`` naming ``what``."""
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or not all(map(_is_positive_int, shape))
    ):
        raise ValueError(f"{what}: shape must be two positive int sizes (out, in), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1


def _check_positive_int(value: Any, name: str, meaning: str) -> None:
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be a positive int ({meaning}), got {value!r}")
