"""Compress a model: factorize its targeted ``nn.Linear`` layers and swap in low-rank layers.

:func:`factorize_model` validates the request (budget, solver, Fisher keys and shapes, the
calibration statistics the solver needs), turns the budget into one rank per layer
(:func:`layer_ranks`) and factorizes every targeted layer with
:func:`~weighted_lowrank.lowrank.solvers.factorize_batch`; :func:`apply_factors` swaps the
factors into a deep copy of the model as :class:`~weighted_lowrank.lowrank.layer.LowRankLinear`;
:func:`compress_model` does both. :func:`svd_reference_losses` is plain truncated SVD's weighted
loss per layer, the reference every solver's loss is reported against.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from weighted_lowrank.lowrank.calibration import statistic_key
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.layer import LowRankLinear, replace_module
from weighted_lowrank.lowrank.objective import FactorizationResult, rank_for_budget
from weighted_lowrank.lowrank.solvers import SOLVERS, factorize_batch, solver_needs
from weighted_lowrank.lowrank.targets import select_linear_modules


def layer_ranks(shapes: Mapping[str, tuple[int, int]], budget: float) -> dict[str, int]:
    """``{module name: rank}`` keeping ``budget`` of each (out × in) layer's dense parameters.

    Rank from :func:`~weighted_lowrank.lowrank.objective.rank_for_budget`; a layer where that rank
    is 0 or keeps at least as many parameters as the dense weight raises ``ValueError`` naming it.
    """
    ranks = {}
    for name, (out_features, in_features) in shapes.items():
        dense = out_features * in_features
        smallest = (out_features + in_features) / dense
        try:
            rank = rank_for_budget((out_features, in_features), budget)
        except ValueError as exc:
            raise ValueError(
                f"budget {budget} gives rank 0 for layer {name!r} ({out_features}x{in_features}): {exc}; "
                f"expected a budget of at least {smallest:.4g} so that every targeted layer keeps rank 1"
            ) from exc
        if rank < 1:
            raise ValueError(
                f"budget {budget} gives rank {rank} for layer {name!r} ({out_features}x{in_features}); "
                f"expected a budget of at least {smallest:.4g} so that every targeted layer keeps rank 1"
            )
        if rank * (out_features + in_features) >= dense:
            raise ValueError(
                f"rank {rank} for layer {name!r} ({out_features}x{in_features}) keeps "
                f"{rank * (out_features + in_features)} parameters, not fewer than the dense {dense}; "
                "expected a budget that saves parameters in every layer"
            )
        ranks[name] = rank
    return ranks


def factorize_model(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    budget: float,
    solver: str,
    targets: str | Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    statistics: Mapping[str, torch.Tensor] | None = None,
    **solver_options: Any,
) -> dict[str, FactorizationResult]:
    """Factorize the targeted Linear layers of ``model``; ``{module name: result}`` in model order.

    ``fisher`` maps ``"<module>.weight"`` to an importance tensor shaped like the weight
    (``None``: uniform importance, i.e. plain SVD weighting). ``budget`` ∈ (0, 1) is the fraction of
    each layer's dense weight parameters kept (:func:`layer_ranks`). ``statistics`` maps
    ``"<module>.<statistic>"`` to the calibration statistics the solver needs
    (:func:`~weighted_lowrank.lowrank.solvers.solver_needs`); every check — keys, shapes, finite,
    symmetric moments — runs before any factorization. ``device`` is where the solver runs.
    Half-precision weights are factorized in float32, float64 ones in float64; the factors stay
    on ``device`` in that dtype.
    ``solver_options`` go to :func:`~weighted_lowrank.lowrank.solvers.factorize_batch`, which
    solves same-(shape, rank) layers as one batch (see :func:`layer_seconds`). ``model`` is not
    modified.
    """
    if not isinstance(budget, int | float) or isinstance(budget, bool) or not 0 < budget < 1:
        raise ValueError(
            f"budget must be a fraction in (0, 1) of dense layer parameters, got {budget!r}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is unknown; expected one of {list(SOLVERS)}")
    modules = select_linear_modules(model, targets)
    shapes = {name: tuple(module.weight.shape) for name, module in modules.items()}
    if fisher is not None:
        missing = [f"{name}.weight" for name in modules if f"{name}.weight" not in fisher]
        if missing:
            raise ValueError(
                f"fisher has no importance for {missing[:5]} ({len(missing)} targeted weights); "
                f"expected keys '<module>.weight' for every targeted module, got e.g. {sorted(fisher)[:5]}"
            )
        wrong = {
            f"{name}.weight": tuple(fisher[f"{name}.weight"].shape)
            for name in modules
            if tuple(fisher[f"{name}.weight"].shape) != shapes[name]
        }
        if wrong:
            raise ValueError(f"fisher tensors {wrong} do not have the shape of their weights")
    needs = solver_needs(solver, **solver_options)
    ranks = layer_ranks(shapes, budget)
    run_device = resolve_device(device)

    names = list(modules)
    # Half-precision weights are factorized in float32; float64 ones keep their precision.
    dtypes = {
        name: torch.float64 if modules[name].weight.dtype == torch.float64 else torch.float32
        for name in names
    }
    weights = [modules[name].weight.detach().to(run_device, dtypes[name]) for name in names]
    importances = [
        None if fisher is None else fisher[f"{name}.weight"].detach().to(run_device, dtypes[name])
        for name in names
    ]
    # Only what is there: factorize_batch names the modules that lack a needed statistic.
    layer_statistics = [
        {
            need: statistics[statistic_key(name, need)]
            for need in needs
            if statistics is not None and statistic_key(name, need) in statistics
        }
        for name in names
    ]
    results = factorize_batch(
        weights,
        importances,
        [ranks[name] for name in names],
        solver=solver,
        statistics=layer_statistics,
        names=names,
        **solver_options,
    )
    if len(results) != len(names):
        raise ValueError(
            f"solver {solver!r} returned {len(results)} results for {len(names)} layers"
        )
    return dict(zip(names, results, strict=True))


def apply_factors(model: nn.Module, results: Mapping[str, FactorizationResult]) -> nn.Module:
    """A deep copy of ``model`` whose modules named in ``results`` are :class:`LowRankLinear`.

    Each replaced ``nn.Linear`` gives its bias (copied), device, dtype and train/eval mode to the
    low-rank layer built from the result's ``left`` / ``right``. ``model`` is not modified.
    """
    compressed = copy.deepcopy(model)
    for name, result in results.items():
        dense = model.get_submodule(name)
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(dense).__name__}, expected nn.Linear")
        expected = (dense.out_features, result.rank), (result.rank, dense.in_features)
        if (tuple(result.left.shape), tuple(result.right.shape)) != expected:
            raise ValueError(
                f"solver {result.solver!r} returned factors {tuple(result.left.shape)} @ "
                f"{tuple(result.right.shape)} for layer {name!r}; expected {expected[0]} @ {expected[1]}"
            )
        weight = dense.weight
        layer = LowRankLinear.from_factors(
            result.left.detach().to(weight.device, weight.dtype),
            result.right.detach().to(weight.device, weight.dtype),
            None if dense.bias is None else dense.bias.detach().clone(),
        )
        layer.train(dense.training)
        replace_module(compressed, name, layer)
    return compressed


def compress_model(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    budget: float,
    solver: str,
    targets: str | Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    **solver_options: Any,
) -> tuple[nn.Module, dict[str, FactorizationResult]]:
    """``(compressed deep copy, {module name: FactorizationResult})``, layers in model order.

    :func:`factorize_model` then :func:`apply_factors`; the arguments are those of
    :func:`factorize_model`. The factors go back to the model's device and dtype.
    """
    results = factorize_model(
        model, fisher, budget, solver, targets, device=device, **solver_options
    )
    return apply_factors(model, results), results


def svd_reference_losses(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    budget: float,
    targets: str | Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Plain truncated SVD's weighted loss per targeted layer, ``{module name: loss}``.

    The reference of every solver's ``loss_rel_svd``: the same layers, ranks, dtypes, device and
    importance as :func:`factorize_model` with ``solver="svd"`` (SVD's default options).
    """
    results = factorize_model(model, fisher, budget, "svd", targets, device=device)
    return {name: float(result.loss) for name, result in results.items()}


def layer_seconds(results: Mapping[str, FactorizationResult]) -> dict[str, float]:
    """Each layer's share of the wall time of its batch: ``result.seconds / batch size``.

    ``factorize_batch`` solves the layers of equal (shape, rank) together and gives each of them
    the batch's wall time; the share splits it evenly.
    """

    def group(result: FactorizationResult) -> tuple[int, int, int]:
        return (result.left.shape[0], result.right.shape[1], result.rank)

    sizes: dict[tuple[int, int, int], int] = {}
    for result in results.values():
        sizes[group(result)] = sizes.get(group(result), 0) + 1
    return {name: float(result.seconds) / sizes[group(result)] for name, result in results.items()}
