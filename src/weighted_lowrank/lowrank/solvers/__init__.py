"""Registry of weighted low-rank solvers and the two entry points ``factorize`` / ``factorize_batch``.

Each solver family lives in its own module and works on batches of same-shape layers;
``factorize_batch`` groups layers by (shape, rank) so the layers of one group share batched
matmuls, and returns the same results as one ``factorize`` call per layer (up to time caps).
Some solvers also read per-layer calibration statistics
(:mod:`~weighted_lowrank.lowrank.calibration`); :func:`solver_needs` says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from weighted_lowrank.lowrank.calibration import CALIBRATION_STATISTICS
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fanout import fan_out
from weighted_lowrank.lowrank.objective import FactorizationResult, validate_problem, weighted_loss
from weighted_lowrank.lowrank.solvers._common import (
    KFWSVD_NEEDS,
    Problem,
    SolverOutput,
    build_problem,
    resolve_options,
    statistic_shapes,
    validate_statistic,
)
from weighted_lowrank.lowrank.solvers.als import ALS_OPTIONS, solve_als
from weighted_lowrank.lowrank.solvers.calibrated import (
    ASVD_OPTIONS,
    KFWSVD_OPTIONS,
    SVD_LLM_OPTIONS,
    solve_asvd,
    solve_kfwsvd,
    solve_svd_llm,
)
from weighted_lowrank.lowrank.solvers.closed_form import (
    FWSVD_OPTIONS,
    SVD_OPTIONS,
    solve_fwsvd,
    solve_svd,
)
from weighted_lowrank.lowrank.solvers.em import EM_OPTIONS, solve_em
from weighted_lowrank.lowrank.solvers.gradient import (
    ADAM_OPTIONS,
    ADAM_SGD_OPTIONS,
    GRADIENT_WINDOW,
    SGD_OPTIONS,
    solve_adam,
    solve_adam_sgd,
    solve_sgd,
)
from weighted_lowrank.lowrank.solvers.spectra import (
    SpectrumFunction,
    asvd_spectrum,
    fwsvd_spectrum,
    kfwsvd_spectrum,
    kronecker_rank_losses,
    proxy_spectrum,
    rank_losses,
    svd_llm_spectrum,
    svd_spectrum,
)
from weighted_lowrank.lowrank.solvers.tfwsvd import TFWSVD_OPTIONS, TFWSVD_WINDOW, solve_tfwsvd


@dataclass(frozen=True)
class SolverSpec:
    """A solver: its batched implementation, its options with their defaults, the
    calibration statistics it always reads (a subset of ``CALIBRATION_STATISTICS``), and the
    weighted spectrum its loss-vs-rank curve comes from (:mod:`.spectra`), named by ``curve``."""

    solve: Callable[[Problem, dict[str, Any], float], list[SolverOutput]]
    options: dict[str, Any]
    spectrum: SpectrumFunction
    curve: str
    needs: tuple[str, ...] = ()


#: The curve of the element-wise solvers, which have no spectrum of their own.
PROXY_CURVE = "fwsvd (proxy)"

_REGISTRY: dict[str, SolverSpec] = {
    "svd": SolverSpec(solve_svd, SVD_OPTIONS, svd_spectrum, "svd"),
    "fwsvd": SolverSpec(solve_fwsvd, FWSVD_OPTIONS, fwsvd_spectrum, "fwsvd"),
    "adam": SolverSpec(solve_adam, ADAM_OPTIONS, proxy_spectrum, PROXY_CURVE),
    "sgd": SolverSpec(solve_sgd, SGD_OPTIONS, proxy_spectrum, PROXY_CURVE),
    "adam_sgd": SolverSpec(solve_adam_sgd, ADAM_SGD_OPTIONS, proxy_spectrum, PROXY_CURVE),
    "als": SolverSpec(solve_als, ALS_OPTIONS, proxy_spectrum, PROXY_CURVE),
    "em": SolverSpec(solve_em, EM_OPTIONS, proxy_spectrum, PROXY_CURVE),
    "tfwsvd": SolverSpec(solve_tfwsvd, TFWSVD_OPTIONS, proxy_spectrum, PROXY_CURVE),
    "kfwsvd": SolverSpec(solve_kfwsvd, KFWSVD_OPTIONS, kfwsvd_spectrum, "kfwsvd", KFWSVD_NEEDS),
    "svd_llm": SolverSpec(
        solve_svd_llm, SVD_LLM_OPTIONS, svd_llm_spectrum, "svd_llm", ("input_moment",)
    ),
    "asvd": SolverSpec(solve_asvd, ASVD_OPTIONS, asvd_spectrum, "asvd", ("input_abs_mean",)),
}

#: Names accepted by ``factorize(..., solver=...)``.
SOLVERS: tuple[str, ...] = tuple(_REGISTRY)
#: Iterations over which each iterative solver measures its relative-improvement ``tol``.
STOPPING_WINDOWS: dict[str, int] = {
    "adam": GRADIENT_WINDOW,
    "sgd": GRADIENT_WINDOW,
    "adam_sgd": GRADIENT_WINDOW,
    "als": 1,
    "em": 1,
    "tfwsvd": TFWSVD_WINDOW,
}


def solver_options(solver: str) -> dict[str, Any]:
    """The options ``solver`` accepts, with their defaults."""
    return dict(_spec(solver).options)


def solver_needs(solver: str, **options: Any) -> tuple[str, ...]:
    """The calibration statistics ``solver`` reads with these options, in storage order.

    An iterative solver started from ``init="kfwsvd"`` reads both moments.
    """
    spec = _spec(solver)
    resolved = resolve_options(solver, options, spec.options)
    needs = set(spec.needs)
    if resolved.get("init") == "kfwsvd":
        needs.update(KFWSVD_NEEDS)
    return tuple(name for name in CALIBRATION_STATISTICS if name in needs)


def _spec(solver: str) -> SolverSpec:
    if solver not in _REGISTRY:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    return _REGISTRY[solver]


def factorize(
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    rank: int,
    solver: str = "tfwsvd",
    *,
    statistics: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> FactorizationResult:
    """Factorize ``weight ≈ left @ right`` with rank ``rank`` minimising ``Σ I (W − left@right)²``.

    ``importance`` has the weight's shape and is ``>= 0`` (``None`` = uniform). Options depend on
    the solver (see :func:`solver_options`); unknown ones raise ``ValueError``. ``statistics``
    holds the calibration statistics the solver needs (:func:`solver_needs`), e.g.
    ``{"input_moment": A}``; the solver then minimises its own quadratic, while ``loss`` stays
    the importance-weighted one.
    """
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
    dask_address: str | None = None,
    **options: Any,
) -> list[FactorizationResult]:
    """``factorize`` for many layers at once; layers of equal (shape, rank) share batched matmuls.

    Results come back in input order. Time caps (``max_seconds``) apply per group of layers.
    ``statistics`` gives each layer's calibration statistics by name (without a module prefix);
    every statistic the solver needs is checked for every layer before any solve. ``names``
    label the layers in errors (default ``"layer <index>"``).

    ``dask_address`` (a Dask scheduler, e.g. ``tcp://host:8786``): every group is solved as one
    task on that cluster (:func:`~weighted_lowrank.lowrank.fanout.fan_out`), on the worker's
    device given by the ``device`` option (``None``: the weights' device type); the checks above
    still run here first. The results are those of the sequential solve — same groups, seeds and
    iteration-based stopping, the caller's torch thread count — except the wall-clock fields
    (``seconds``, the history's times) and that the factors come back on the CPU.
    """
    spec = _spec(solver)
    resolved = resolve_options(solver, options, spec.options)
    if not (len(weights) == len(importances) == len(ranks)):
        raise ValueError(
            f"weights, importances and ranks must have equal lengths, got "
            f"{len(weights)}, {len(importances)}, {len(ranks)}"
        )
    if not weights:
        raise ValueError("factorize_batch needs at least one weight")
    labels = [f"layer {k}" for k in range(len(weights))] if names is None else list(names)
    for label, weight, importance, rank in zip(labels, weights, importances, ranks, strict=False):
        try:
            validate_problem(weight, importance, rank)
        except ValueError as exc:
            if len(weights) == 1 and names is None:
                raise
            raise ValueError(f"{label}: {exc}") from None
    needed = _needed_statistics(
        solver, solver_needs(solver, **options), weights, statistics, labels
    )
    groups: dict[tuple, list[int]] = {}
    for index, (weight, rank) in enumerate(zip(weights, ranks, strict=True)):
        groups.setdefault((tuple(weight.shape), rank, weight.device), []).append(index)
    jobs = [
        (
            solver,
            resolved,
            rank,
            resolved["device"] if dask_address is None else _worker_device(resolved, source),
            [weights[i] for i in indices],
            [importances[i] for i in indices],
            [needed[i] for i in indices] if needed else None,
            [labels[i] for i in indices],
        )
        for (_, rank, source), indices in groups.items()
    ]
    if dask_address is None:
        solved = [_solve_group(*job) for job in jobs]
    else:
        solved = fan_out(dask_address, _solve_group, [_on_cpu(job) for job in jobs], name=solver)
    results: list[FactorizationResult | None] = [None] * len(weights)
    for indices, group_results in zip(groups.values(), solved, strict=True):
        for index, result in zip(indices, group_results, strict=True):
            results[index] = result
    return [result for result in results if result is not None]


def _solve_group(
    solver: str,
    resolved: dict[str, Any],
    rank: int,
    device: str | torch.device | None,
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    statistics: list[dict[str, torch.Tensor]] | None,
    labels: list[str],
) -> list[FactorizationResult]:
    """Solve one group of same-(shape, rank, device) layers, already checked; results in order.

    ``device`` is where the solve runs (``None``: the weights' device). What
    :func:`factorize_batch` runs per group, here or on a Dask worker.
    """
    device = resolve_device(device, weights[0].device)
    started = time.perf_counter()
    problem = build_problem(weights, importances, rank, device, statistics=statistics, names=labels)
    outputs = _spec(solver).solve(problem, resolved, started)
    seconds = time.perf_counter() - started
    return [
        _to_result(weight, importance, rank, solver, problem, position, output, seconds)
        for position, (weight, importance, output) in enumerate(
            zip(weights, importances, outputs, strict=True)
        )
    ]


def _worker_device(resolved: dict[str, Any], source: torch.device) -> str | torch.device:
    """Where a fanned-out group runs: the ``device`` option, else the weights' device type (the
    worker's own GPU for weights on a GPU here)."""
    return resolved["device"] if resolved["device"] is not None else source.type


def _on_cpu(job: tuple) -> tuple:
    """A group's arguments with every tensor on the CPU, to ship to a worker."""

    def cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.cpu()
        if isinstance(value, list):
            return [cpu(item) for item in value]
        if isinstance(value, dict):
            return {key: cpu(item) for key, item in value.items()}
        return value

    return tuple(cpu(value) for value in job)


def solver_curve(solver: str) -> str:
    """Which spectrum ``solver``'s loss-vs-rank curve comes from (its own, or the proxy)."""
    return _spec(solver).curve


def curve_needs(solver: str, loss_model: str = "own", **options: Any) -> tuple[str, ...]:
    """The calibration statistics ``solver``'s loss curve reads under ``loss_model``."""
    needs = set(solver_needs(solver, **options))
    if _checked_curve_model(loss_model) == "kronecker":
        needs.update(KFWSVD_NEEDS)
    return tuple(name for name in CALIBRATION_STATISTICS if name in needs)


def rank_loss_curves(
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    solver: str,
    *,
    num_examples: int = 1,
    loss_model: str = "own",
    statistics: list[Mapping[str, torch.Tensor] | None] | None = None,
    names: list[str] | None = None,
    dask_address: str | None = None,
    **options: Any,
) -> list[torch.Tensor]:
    """Per layer, the predicted loss increase (nats per example) of ``solver`` at every rank.

    Element ``r − 1`` of each (min(out, in),) float64 tensor is the loss of the rank-r solution.
    ``loss_model="own"``: under the solver's own quadratic — exact for the closed forms, the
    two-sided FWSVD proxy for the element-wise solvers (:mod:`.spectra`). ``"kronecker"``: the
    same solutions (the solver's truncation path; the proxy's for the element-wise solvers)
    priced by the Kronecker-factored model ½ tr(ΔWᵀ G ΔW A), which needs both moments. Either
    way rescaled so that the curvature has the trace of the layer's diagonal Fisher,
    ``importance`` summed over ``num_examples`` examples (``None``: uniform importance 1).
    Same-shape layers share one batched decomposition; inputs are checked as
    :func:`factorize_batch` checks them. ``dask_address``: every same-shape group is one task on
    that Dask cluster, as in :func:`factorize_batch` (the same curves).
    """
    spec = _spec(solver)
    resolved = resolve_options(solver, options, spec.options)
    kronecker = _checked_curve_model(loss_model) == "kronecker"
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
    if len(weights) != len(importances) or not weights:
        raise ValueError(
            f"weights and importances must be non-empty and of equal length, got "
            f"{len(weights)} and {len(importances)}"
        )
    labels = [f"layer {k}" for k in range(len(weights))] if names is None else list(names)
    for label, weight, importance in zip(labels, weights, importances, strict=False):
        try:
            validate_problem(weight, importance, 1)
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None
    needed = _needed_statistics(
        solver, curve_needs(solver, loss_model, **options), weights, statistics, labels
    )
    groups: dict[tuple, list[int]] = {}
    for index, weight in enumerate(weights):
        groups.setdefault((tuple(weight.shape), weight.device), []).append(index)
    jobs = [
        (
            solver,
            resolved,
            kronecker,
            num_examples,
            resolved["device"] if dask_address is None else _worker_device(resolved, source),
            [weights[i] for i in indices],
            [importances[i] for i in indices],
            [needed[i] for i in indices] if needed else None,
            [labels[i] for i in indices],
        )
        for (_, source), indices in groups.items()
    ]
    if dask_address is None:
        priced = [_curve_group(*job) for job in jobs]
    else:
        priced = fan_out(
            dask_address, _curve_group, [_on_cpu(job) for job in jobs], name=f"{solver}-curves"
        )
    curves: list[torch.Tensor | None] = [None] * len(weights)
    for indices, group_curves in zip(groups.values(), priced, strict=True):
        for index, curve in zip(indices, group_curves, strict=True):
            curves[index] = curve
    return [curve for curve in curves if curve is not None]


def _curve_group(
    solver: str,
    resolved: dict[str, Any],
    kronecker: bool,
    num_examples: int,
    device: str | torch.device | None,
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    statistics: list[dict[str, torch.Tensor]] | None,
    labels: list[str],
) -> list[torch.Tensor]:
    """The loss curves of one group of same-shape layers, already checked (what
    :func:`rank_loss_curves` runs per group, here or on a Dask worker)."""
    device = resolve_device(device, weights[0].device)
    problem = build_problem(weights, importances, 1, device, statistics=statistics, names=labels)
    totals = torch.tensor(
        [
            float(weight.numel()) if importance is None else float(importance.double().sum())
            for weight, importance in zip(weights, importances, strict=True)
        ],
        dtype=torch.float64,
    )
    spectrum = _spec(solver).spectrum(problem, resolved, kronecker)
    price = kronecker_rank_losses if kronecker else rank_losses
    losses = price(spectrum, problem, totals, num_examples)
    return [losses[position] for position in range(len(weights))]


#: The loss models a curve can price each rank's solution with.
CURVE_LOSS_MODELS = ("own", "kronecker")


def _checked_curve_model(loss_model: str) -> str:
    if loss_model not in CURVE_LOSS_MODELS:
        raise ValueError(
            f"curve loss model {loss_model!r} is unknown; expected one of {CURVE_LOSS_MODELS}"
        )
    return loss_model


def _needed_statistics(
    solver: str,
    needs: tuple[str, ...],
    weights: list[torch.Tensor],
    statistics: list[Mapping[str, torch.Tensor] | None] | None,
    labels: list[str],
) -> list[dict[str, torch.Tensor]]:
    """Each layer's statistics that ``solver`` needs, every one checked; [] when it needs none."""
    if len(labels) != len(weights) or (statistics is not None and len(statistics) != len(weights)):
        raise ValueError(
            f"statistics and names must have one entry per weight ({len(weights)}), got "
            f"{'None' if statistics is None else len(statistics)} and {len(labels)}"
        )
    if not needs:
        return []
    if statistics is None:
        statistics = [None] * len(weights)
    for statistic in needs:
        missing = [
            label
            for label, layer in zip(labels, statistics, strict=True)
            if layer is None or statistic not in layer
        ]
        if missing:
            raise ValueError(
                f"solver {solver!r} needs {statistic} for {missing[:5]} ({len(missing)} of "
                f"{len(labels)} layers); expected {list(needs)} for every layer — from a model, "
                f"keys '<module>.{statistic}': run fisher_estimation with the calibration "
                "statistics enabled and pass them as statistics="
            )
    needed = []
    for weight, label, layer in zip(weights, labels, statistics, strict=True):
        shapes = statistic_shapes(*weight.shape)
        for statistic in needs:
            problem = validate_statistic(statistic, layer[statistic], shapes[statistic])
            if problem is not None:
                raise ValueError(f"solver {solver!r}, layer {label!r}: {problem}")
        needed.append({statistic: layer[statistic] for statistic in needs})
    return needed


def _to_result(
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    rank: int,
    solver: str,
    problem: Problem,
    position: int,
    output: SolverOutput,
    seconds: float,
) -> FactorizationResult:
    """Undo the normalisation, measure the loss in float64 and keep the better of final/initial."""
    scale = float(problem.scale[position])
    factor_scale = float(problem.weight_scale[position]) ** 0.5

    def original(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            (left * factor_scale).to(weight.device, weight.dtype),
            (right * factor_scale).to(weight.device, weight.dtype),
        )

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
        rank=rank,
        iterations=output.iterations,
        seconds=seconds,
        initial_loss=initial_loss,
        stop_reason=output.stop_reason,
        info=output.info,
    )
