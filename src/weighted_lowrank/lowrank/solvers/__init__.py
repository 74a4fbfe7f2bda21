"""Registry of weighted low-rank solvers and the entry points ``factorize`` / ``factorize_batch``
/ ``rank_loss_curves``.

Each family module declares its ``SPEC`` (or ``SPECS``), a :class:`~._common.SolverSpec`; the
registry collects them and :func:`register_solver` adds one from anywhere (what a solver needs is
re-exported here). ``factorize_batch`` solves layers of equal (shape, rank) as one batch, with the
results of one ``factorize`` call per layer (up to time caps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any

import torch

from weighted_lowrank.lowrank.calibration import CALIBRATION_STATISTICS
from weighted_lowrank.lowrank.devices import resolve_device, worker_threads
from weighted_lowrank.lowrank.objective import FactorizationResult, validate_problem, weighted_loss
from weighted_lowrank.lowrank.solvers import als, calibrated, closed_form, em, gradient, tfwsvd

# IterativeOptions, option, exact_outputs: re-exported for solver modules outside the package.
from weighted_lowrank.lowrank.solvers._common import (  # noqa: F401
    KFWSVD_NEEDS,
    IterativeOptions,
    Options,
    Problem,
    SolverOutput,
    SolverSpec,
    build_problem,
    option,
    validate_statistic,
)
from weighted_lowrank.lowrank.solvers.closed_form import exact_outputs  # noqa: F401
from weighted_lowrank.lowrank.solvers.spectra import kronecker_rank_losses, rank_losses

#: A callable with the builtin ``map``'s signature that runs one function per group of layers:
#: ``map`` here, or :func:`~weighted_lowrank.lowrank.dask_map.dask_map` on a Dask cluster.
MapGroups = Callable[..., Iterable[Any]]

_REGISTRY: dict[str, SolverSpec] = {
    **closed_form.SPECS,
    **gradient.SPECS,
    "als": als.SPEC,
    "em": em.SPEC,
    "tfwsvd": tfwsvd.SPEC,
    **calibrated.SPECS,
}
#: The built-in solvers, in the order the pipelines build their namespaces.
SOLVERS: tuple[str, ...] = tuple(_REGISTRY)
#: Iterations over which each built-in iterative solver measures its relative-improvement ``tol``.
STOPPING_WINDOWS: dict[str, int] = {
    name: spec.window for name, spec in _REGISTRY.items() if spec.window is not None
}
#: The loss models a curve can price each rank's solution with.
CURVE_LOSS_MODELS = ("own", "kronecker")


def register_solver(name: str, spec: SolverSpec) -> None:
    """Make ``spec`` available as ``factorize(..., solver=name)`` (and to the pipelines' nodes)."""
    _REGISTRY[name] = spec


def solver_spec(solver: str) -> SolverSpec:
    """The registered spec of ``solver``."""
    if solver not in _REGISTRY:
        raise ValueError(f"unknown solver {solver!r}; expected one of {tuple(_REGISTRY)}")
    return _REGISTRY[solver]


def check_solver_options(solver: str, options: Mapping[str, Any]) -> Options:
    """``solver``'s options with ``options`` over its defaults; unknown names and bad values are a
    ``ValueError`` naming the solver, the option, the value and what is expected."""
    spec = solver_spec(solver)
    accepted = sorted(item.name for item in fields(spec.options))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"solver {solver!r} got unknown option(s) {unknown}; it accepts {accepted}"
        )
    try:
        return spec.options(**options)
    except ValueError as error:
        raise ValueError(f"solver {solver!r}: {error}") from None


def solver_options(solver: str) -> dict[str, Any]:
    """The options ``solver`` accepts, with their defaults."""
    defaults = solver_spec(solver).options()
    return {item.name: getattr(defaults, item.name) for item in fields(defaults)}


def solver_needs(solver: str, **options: Any) -> tuple[str, ...]:
    """The calibration statistics ``solver`` reads with these options, in storage order."""
    needs = {*solver_spec(solver).needs, *check_solver_options(solver, options).added_needs()}
    return tuple(name for name in CALIBRATION_STATISTICS if name in needs)


def curve_needs(solver: str, loss_model: str = "own", **options: Any) -> tuple[str, ...]:
    """The calibration statistics ``solver``'s loss curve reads under ``loss_model``."""
    if loss_model not in CURVE_LOSS_MODELS:
        raise ValueError(
            f"curve loss model {loss_model!r} is unknown; expected one of {CURVE_LOSS_MODELS}"
        )
    needs = set(solver_needs(solver, **options))
    if loss_model == "kronecker":
        needs.update(KFWSVD_NEEDS)
    return tuple(name for name in CALIBRATION_STATISTICS if name in needs)


def factorize(
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    rank: int,
    solver: str = "tfwsvd",
    *,
    statistics: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> FactorizationResult:
    """Factorize ``weight ≈ left @ right`` with rank ``rank`` minimising ``Σ I (W − left@right)²``
    (``importance >= 0``, ``None`` = uniform). ``statistics`` holds what the solver needs
    (:func:`solver_needs`), e.g. ``{"input_moment": A}``; ``loss`` is always the weighted one."""
    return factorize_batch(
        [weight], [importance], [rank], solver=solver, statistics=[statistics], **options
    )[0]


def factorize_batch(
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    ranks: list[int],
    solver: str = "tfwsvd",
    *,
    statistics: list[Mapping[str, torch.Tensor] | None] | None = None,
    names: list[str] | None = None,
    map_groups: MapGroups = map,
    threads: int = 1,
    **options: Any,
) -> list[FactorizationResult]:
    """``factorize`` for many layers at once, results in input order; layers of equal (shape,
    rank) share batched matmuls, and time caps (``max_seconds``) apply per group.

    ``statistics``: each layer's calibration statistics by name, all checked before any solve;
    ``names`` label the layers in errors. ``map_groups`` runs the groups (:func:`_by_group`);
    ``threads`` worker threads share each group's small CPU work
    (:func:`~weighted_lowrank.lowrank.devices.worker_threads`). Neither changes the results but
    for the wall-clock fields and, for ``threads``, the rounding of sums over chunks.
    """
    resolved = check_solver_options(solver, options)
    labels, needed = _checked_layers(
        solver, weights, importances, ranks, statistics, names, solver_needs(solver, **options)
    )
    return _by_group(
        _solve_group,
        lambda index: (tuple(weights[index].shape), ranks[index], weights[index].device),
        lambda key: (solver, resolved, key[1], threads),
        (weights, importances, needed, labels),
        resolved.device,
        map_groups,
    )


def rank_loss_curves(
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    solver: str,
    *,
    num_examples: int = 1,
    loss_model: str = "own",
    statistics: list[Mapping[str, torch.Tensor] | None] | None = None,
    names: list[str] | None = None,
    map_groups: MapGroups = map,
    threads: int = 1,
    **options: Any,
) -> list[torch.Tensor]:
    """Per layer, the predicted loss increase (nats per example) of ``solver`` at every rank.

    Element ``r − 1`` of each (min(out, in),) float64 tensor prices the rank-r solution (the FWSVD
    proxy's for the element-wise solvers, :mod:`.spectra`) under the solver's own quadratic
    (``loss_model="own"``) or the Kronecker-factored ½ tr(ΔWᵀ G ΔW A) (``"kronecker"``, needs
    both moments), rescaled to the trace of the layer's diagonal Fisher, ``importance`` summed
    over ``num_examples`` examples. Inputs, ``map_groups`` and ``threads``: as
    :func:`factorize_batch`.
    """
    resolved = check_solver_options(solver, options)
    needs = curve_needs(solver, loss_model, **options)
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
    labels, needed = _checked_layers(
        solver, weights, importances, [1] * len(weights), statistics, names, needs
    )
    return _by_group(
        _curve_group,
        lambda index: (tuple(weights[index].shape), weights[index].device),
        lambda key: (solver, resolved, loss_model == "kronecker", num_examples, threads),
        (weights, importances, needed, labels),
        resolved.device,
        map_groups,
    )


def _by_group(
    function: Callable[..., list[Any]],
    group_of: Callable[[int], Hashable],
    arguments_of: Callable[[Any], tuple],
    per_layer: tuple[list[Any], ...],
    device: str | torch.device | None,
    map_groups: MapGroups,
) -> list[Any]:
    """Run ``function(*arguments_of(key), device, per-layer lists)`` once per group of layers
    ``group_of(index)`` through ``map_groups``; per-layer results in input order.

    ``device`` ``None`` runs a group on its layers' device (the key's last element) — its type
    under a ``map_groups`` that may run elsewhere (e.g. a worker's own GPU).
    """
    groups: dict[Hashable, list[int]] = {}
    for index in range(len(per_layer[0])):
        groups.setdefault(group_of(index), []).append(index)
    jobs = [
        (
            *arguments_of(key),
            device if device is not None or map_groups is map else key[-1].type,
            tuple([values[i] for i in indices] if values else None for values in per_layer),
        )
        for key, indices in groups.items()
    ]
    results: list[Any] = [None] * len(per_layer[0])
    solved: Iterator[list[Any]] = iter(map_groups(function, *zip(*jobs, strict=True)))
    for indices, group_results in zip(groups.values(), solved, strict=True):
        for index, result in zip(indices, group_results, strict=True):
            results[index] = result
    return results


def _solve_group(
    solver: str, resolved: Options, rank: int, threads: int, device: Any, layers: tuple
) -> list[FactorizationResult]:
    """Solve one group of checked same-(shape, rank, device) layers ``(weights, importances,
    statistics, labels)``; results in order."""
    weights, importances, statistics, labels = layers
    device = resolve_device(device, weights[0].device)
    started = time.perf_counter()
    problem = build_problem(weights, importances, rank, device, statistics=statistics, names=labels)
    with worker_threads(threads):
        outputs = solver_spec(solver).solve(problem, resolved, started)
    seconds = time.perf_counter() - started
    return [
        _to_result(weight, importance, solver, problem, position, output, seconds)
        for position, (weight, importance, output) in enumerate(
            zip(weights, importances, outputs, strict=True)
        )
    ]


def _curve_group(
    solver: str,
    resolved: Options,
    kronecker: bool,
    examples: int,
    threads: int,
    device: Any,
    layers: tuple,
) -> list[torch.Tensor]:
    """The loss curves of one group of checked same-shape layers (as :func:`_solve_group`)."""
    weights, importances, statistics, labels = layers
    device = resolve_device(device, weights[0].device)
    problem = build_problem(weights, importances, 1, device, statistics=statistics, names=labels)
    totals = torch.tensor(
        [
            float(weight.numel()) if importance is None else float(importance.double().sum())
            for weight, importance in zip(weights, importances, strict=True)
        ],
        dtype=torch.float64,
    )
    with worker_threads(threads):
        spectrum = solver_spec(solver).spectrum(problem, resolved, kronecker)
    price = kronecker_rank_losses if kronecker else rank_losses
    losses = price(spectrum, problem, totals, examples)
    return [losses[position] for position in range(len(weights))]


def _checked_layers(
    solver: str,
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    ranks: list[int],
    statistics: list[Mapping[str, torch.Tensor] | None] | None,
    names: list[str] | None,
    needs: tuple[str, ...],
) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """Every layer checked before any solve: ``(labels, each layer's needed statistics or [])``."""
    if not weights or not (len(weights) == len(importances) == len(ranks)):
        raise ValueError(
            f"weights, importances and ranks must be non-empty and of equal lengths, got "
            f"{len(weights)}, {len(importances)}, {len(ranks)}"
        )
    labels = [f"layer {k}" for k in range(len(weights))] if names is None else list(names)
    if len(labels) != len(weights) or (statistics is not None and len(statistics) != len(weights)):
        raise ValueError(
            f"statistics and names must have one entry per weight ({len(weights)}), got "
            f"{'None' if statistics is None else len(statistics)} and {len(labels)}"
        )
    for label, weight, importance, rank in zip(labels, weights, importances, ranks, strict=True):
        try:
            validate_problem(weight, importance, rank)
        except ValueError as exc:
            if len(weights) == 1 and names is None:
                raise
            raise ValueError(f"{label}: {exc}") from None
    if not needs:
        return labels, []
    layers = [{} if layer is None else layer for layer in statistics or [None] * len(weights)]
    for statistic in needs:
        missing = [
            label for label, layer in zip(labels, layers, strict=True) if statistic not in layer
        ]
        if missing:
            raise ValueError(
                f"solver {solver!r} needs {statistic} for {missing[:5]} ({len(missing)} of "
                f"{len(labels)} layers); expected {list(needs)} for every layer — from a model, "
                f"keys '<module>.{statistic}': run fisher_estimation with the calibration "
                "statistics enabled and pass them as statistics="
            )
    for weight, label, layer in zip(weights, labels, layers, strict=True):
        out_features, in_features = weight.shape
        shapes = {
            "input_moment": (in_features, in_features),
            "output_moment": (out_features, out_features),
            "input_abs_mean": (in_features,),
        }
        for statistic in needs:
            problem = validate_statistic(statistic, layer[statistic], shapes[statistic])
            if problem is not None:
                raise ValueError(f"solver {solver!r}, layer {label!r}: {problem}")
    return labels, [{statistic: layer[statistic] for statistic in needs} for layer in layers]


def _to_result(
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    solver: str,
    problem: Problem,
    position: int,
    output: SolverOutput,
    seconds: float,
) -> FactorizationResult:
    """Undo the normalisation, measure the loss in float64 and keep the better of final/initial."""
    scale = float(problem.scale[position])
    factor_scale = float(problem.weight_scale[position]) ** 0.5

    def original(*factors: torch.Tensor) -> list[torch.Tensor]:
        return [(factor * factor_scale).to(weight.device, weight.dtype) for factor in factors]

    left, right = original(output.left, output.right)
    loss = weighted_loss(weight, importance, left, right)
    history = [(seconds_at, value * scale) for seconds_at, value in output.history]
    initial_loss = history[0][1] if history else loss
    if output.initial is not None:
        initial_left, initial_right = original(*output.initial)
        initial_loss = weighted_loss(weight, importance, initial_left, initial_right)
        if initial_loss < loss:
            left, right, loss = initial_left, initial_right, initial_loss
    return FactorizationResult(
        left=left,
        right=right,
        loss=loss,
        history=history,
        solver=solver,
        rank=problem.rank,
        iterations=output.iterations,
        seconds=seconds,
        initial_loss=initial_loss,
        stop_reason=output.stop_reason,
        info=output.info,
    )
