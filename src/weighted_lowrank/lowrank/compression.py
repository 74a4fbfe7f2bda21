"""Compress a model: factorize its targeted ``nn.Linear`` layers and swap in low-rank layers.

:func:`factorize_model` checks the request and factorizes the layers at a budget's uniform ranks
or an allocation's; :func:`apply_factors` swaps the factors into a deep copy as
:class:`~weighted_lowrank.lowrank.layer.LowRankLinear`; :func:`compress_model` does both.
:func:`svd_reference_losses` is the reference every solver's loss is reported against;
:func:`model_loss_curves` what a global rank allocation spends the budget against.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from weighted_lowrank.lowrank.allocation import LossCurve, max_rank, uniform_ranks
from weighted_lowrank.lowrank.calibration import statistic_key
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.layer import LowRankLinear, replace_module
from weighted_lowrank.lowrank.objective import FactorizationResult
from weighted_lowrank.lowrank.solvers import (
    MapGroups,
    curve_needs,
    factorize_batch,
    rank_loss_curves,
    solver_needs,
)
from weighted_lowrank.lowrank.targets import select_linear_modules

#: ``{module name: rank}`` keeping ``budget`` of each layer's dense parameters (the uniform
#: allocation; a layer where that rank is 0 or saves nothing raises ``ValueError`` naming it).
layer_ranks = uniform_ranks


def factorize_model(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    budget: float | None,
    solver: str,
    targets: str | Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    statistics: Mapping[str, torch.Tensor] | None = None,
    ranks: Mapping[str, int | None] | None = None,
    map_groups: MapGroups = map,
    threads: int = 1,
    **solver_options: Any,
) -> dict[str, FactorizationResult]:
    """Factorize the targeted Linear layers of ``model``; ``{module name: result}`` in model order.

    ``fisher`` maps ``"<module>.weight"`` to an importance shaped like the weight (``None``:
    uniform). Either ``budget`` ∈ (0, 1), the fraction of each layer's dense parameters kept
    (:func:`layer_ranks`), or ``ranks``: every targeted module's rank, ``None`` for a layer kept
    dense (absent from the result). ``statistics`` maps ``"<module>.<statistic>"`` to what the
    solver needs; every check runs before any factorization. Weights are factorized on
    ``device`` in float32 (float64 ones in float64). ``solver_options``, ``map_groups`` and
    ``threads`` go to :func:`~weighted_lowrank.lowrank.solvers.factorize_batch`; a ``map_groups``
    other than ``map`` may run the groups elsewhere (:func:`_staged`), the factors then come back
    on the CPU. ``model`` is not modified.
    """
    device, solver_options = _staged(device, map_groups, solver_options)
    weights, importances = _targeted_layers(model, fisher, targets, device)
    chosen = _chosen_ranks(budget, ranks, {name: tuple(w.shape) for name, w in weights.items()})
    needs = solver_needs(solver, **solver_options)
    names = [name for name in weights if chosen[name] is not None]
    if not names:
        return {}
    results = factorize_batch(
        [weights[name] for name in names],
        [importances[name] for name in names],
        [chosen[name] for name in names],
        solver=solver,
        statistics=[_layer_statistics(statistics, name, needs) for name in names],
        names=names,
        map_groups=map_groups,
        threads=threads,
        **solver_options,
    )
    return dict(zip(names, results, strict=True))


def model_loss_curves(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    solver: str,
    targets: str | Iterable[str] | None = None,
    *,
    num_examples: int = 1,
    loss_model: str = "own",
    device: str | torch.device = "cpu",
    statistics: Mapping[str, torch.Tensor] | None = None,
    map_groups: MapGroups = map,
    threads: int = 1,
    **solver_options: Any,
) -> dict[str, LossCurve]:
    """``{module name: LossCurve}`` of ``solver`` for every targeted layer, in model order: the
    predicted loss increase at every rank that saves parameters
    (:func:`~weighted_lowrank.lowrank.solvers.rank_loss_curves`). Inputs as
    :func:`factorize_model`."""
    device, solver_options = _staged(device, map_groups, solver_options)
    weights, importances = _targeted_layers(model, fisher, targets, device)
    needs = curve_needs(solver, loss_model, **solver_options)
    losses = rank_loss_curves(
        list(weights.values()),
        list(importances.values()),
        solver,
        num_examples=num_examples,
        loss_model=loss_model,
        statistics=[_layer_statistics(statistics, name, needs) for name in weights],
        names=list(weights),
        map_groups=map_groups,
        threads=threads,
        **solver_options,
    )
    curves = {}
    for (name, weight), values in zip(weights.items(), losses, strict=True):
        out_features, in_features = weight.shape
        curves[name] = LossCurve(
            out_features, in_features, values[: max_rank(out_features, in_features)].numpy()
        )
    return curves


def _staged(
    device: str | torch.device, map_groups: MapGroups, solver_options: dict[str, Any]
) -> tuple[str | torch.device, dict[str, Any]]:
    """``(device for the layers here, solver options)``: unchanged with the builtin ``map``;
    otherwise the layers stay on the CPU and ``device`` becomes the solver's ``device`` option
    (unless set), resolved where each group runs (a driver without a GPU fans out to GPUs)."""
    if map_groups is map:
        return device, solver_options
    if solver_options.get("device") is None:
        solver_options = {**solver_options, "device": device}
    return "cpu", solver_options


def _targeted_layers(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    targets: str | Iterable[str] | None,
    device: str | torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """The targeted layers' weights and importances on ``device``, in model order; the Fisher
    must cover them (its shapes: ``factorize_batch``)."""
    modules = select_linear_modules(model, targets)
    if fisher is not None:
        missing = [f"{name}.weight" for name in modules if f"{name}.weight" not in fisher]
        if missing:
            raise ValueError(
                f"fisher has no importance for {missing[:5]} ({len(missing)} targeted weights); "
                f"expected keys '<module>.weight' for every targeted module, got e.g. {sorted(fisher)[:5]}"
            )
    run_device = resolve_device(device)
    weights, importances = {}, {}
    for name, module in modules.items():
        # Half-precision weights are factorized in float32; float64 ones keep their precision.
        dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
        weights[name] = module.weight.detach().to(run_device, dtype)
        importance = None if fisher is None else fisher[f"{name}.weight"]
        importances[name] = (
            None if importance is None else importance.detach().to(run_device, dtype)
        )
    return weights, importances


def _chosen_ranks(
    budget: Any, ranks: Mapping[str, int | None] | None, shapes: Mapping[str, tuple[int, int]]
) -> dict[str, int | None]:
    """Each targeted layer's rank (None: dense) from ``budget`` or ``ranks``, exactly one given;
    ``factorize_batch`` checks each rank against its layer's shape."""
    if ranks is None:
        if not isinstance(budget, int | float) or isinstance(budget, bool) or not 0 < budget < 1:
            raise ValueError(
                f"budget must be a fraction in (0, 1) of dense layer parameters, got {budget!r}"
            )
        return dict(layer_ranks(shapes, budget))
    if budget is not None:
        raise ValueError(f"factorize_model got both budget={budget!r} and ranks; expected one")
    missing = [name for name in shapes if name not in ranks]
    extra = [name for name in ranks if name not in shapes]
    if missing or extra:
        raise ValueError(
            f"ranks must name every targeted module and nothing else; missing {missing[:5]}, "
            f"not targeted {extra[:5]}"
        )
    return {name: ranks[name] for name in shapes}


def _layer_statistics(
    statistics: Mapping[str, torch.Tensor] | None, name: str, needs: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Only what is there: factorize_batch names the modules that lack a needed statistic."""
    if statistics is None:
        return {}
    return {
        need: statistics[statistic_key(name, need)]
        for need in needs
        if statistic_key(name, need) in statistics
    }


def apply_factors(model: nn.Module, results: Mapping[str, FactorizationResult]) -> nn.Module:
    """A deep copy of ``model`` whose modules named in ``results`` are :class:`LowRankLinear`,
    each with its ``nn.Linear``'s bias (copied), device, dtype and train/eval mode."""
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
    """:func:`factorize_model` then :func:`apply_factors`: ``(compressed copy, results)``."""
    results = factorize_model(
        model, fisher, budget, solver, targets, device=device, **solver_options
    )
    return apply_factors(model, results), results


def svd_reference_losses(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    budget: float | None,
    targets: str | Iterable[str] | None = None,
    **placement: Any,
) -> dict[str, float]:
    """Plain truncated SVD's weighted loss per factorized layer: :func:`factorize_model` with
    ``solver="svd"`` and its ``device``, ``ranks``, ``map_groups`` and ``threads`` keywords (SVD's
    default options). The reference of every solver's ``loss_rel_svd``."""
    results = factorize_model(model, fisher, budget, "svd", targets, **placement)
    return {name: float(result.loss) for name, result in results.items()}


def layer_seconds(results: Mapping[str, FactorizationResult]) -> dict[str, float]:
    """Each layer's even share of its batch's wall time (the layers of equal (shape, rank) are
    solved together and each reports the batch's): ``result.seconds / batch size``."""

    def group(result: FactorizationResult) -> tuple[int, int, int]:
        return (result.left.shape[0], result.right.shape[1], result.rank)

    sizes = Counter(group(result) for result in results.values())
    return {name: float(result.seconds) / sizes[group(result)] for name, result in results.items()}
