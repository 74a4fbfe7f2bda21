"""Machinery shared by the solver families: batched problems, options, closed forms, the loop.

Every solver works on a batch of same-shape layers (``(b, out, in)`` tensors), each normalised
(weight RMS 1, importance mean 1: no minimiser changes, one set of default step sizes serves).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Self, TypeVar

import torch

from weighted_lowrank.lowrank.devices import batched_eigh
from weighted_lowrank.lowrank.objective import StopReason
from weighted_lowrank.lowrank.solvers.whitening import DEFAULT_DAMPING, Moment, kronecker_truncation

#: Initialisations an iterative solver may start from ("kfwsvd" needs both calibration moments).
INITS = ("fwsvd", "fwsvd_in", "fwsvd_out", "svd", "best", "random", "kfwsvd")
#: The calibration statistics the "kfwsvd" start reads.
KFWSVD_NEEDS: tuple[str, ...] = ("input_moment", "output_moment")
#: Axes of the closed-form Fisher-weighted SVD.
FWSVD_AXES = ("in", "out", "both")


@dataclass
class Problem:
    """A batch of normalised same-shape problems: loss_original = scale · loss_normalised.

    The statistics the solver needs ride along stacked in float64, each layer's divided by its
    mean diagonal (or mean): ``statistic_scale[name]`` (b,); one nobody needs is ``None``.
    """

    weight: torch.Tensor
    importance: torch.Tensor
    rank: int
    scale: torch.Tensor
    weight_scale: torch.Tensor
    names: list[str] = field(default_factory=list)
    input_moment: torch.Tensor | None = None
    output_moment: torch.Tensor | None = None
    input_abs_mean: torch.Tensor | None = None
    statistic_scale: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.weight.shape[0]


@dataclass
class SolverOutput:
    """What a solver returns per layer, in normalised units (the front end converts)."""

    left: torch.Tensor
    right: torch.Tensor
    history: list[tuple[float, float]]
    iterations: int
    stop_reason: StopReason
    info: dict[str, Any] = field(default_factory=dict)
    initial: tuple[torch.Tensor, torch.Tensor] | None = None


Rule = tuple[Callable[[Any], bool], str]


def _is_int(value: Any, minimum: int = -(2**63)) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def int_at_least(minimum: int) -> Rule:
    return (lambda v: _is_int(v, minimum), f"an int >= {minimum}")


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices, f"one of {choices}")


POSITIVE: Rule = (lambda v: is_number(v) and v > 0, "a number > 0")
NON_NEGATIVE: Rule = (lambda v: is_number(v) and v >= 0, "a number >= 0")
FRACTION: Rule = (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")


def option(default: Any, rule: Rule) -> Any:
    """A solver option: its default and its rule (is the value valid?, what is expected)."""
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class Options:
    """Options every solver accepts; a family subclasses it with its own. Building one checks
    every value (a ``ValueError`` names the option, what is expected and the value)."""

    device: str | torch.device | None = option(
        None,
        (lambda v: v is None or isinstance(v, str | torch.device), "None, 'auto', 'cpu' or 'cuda'"),
    )
    seed: int = option(0, (_is_int, "an int"))

    def __post_init__(self) -> None:
        for item in fields(self):
            valid, expected = item.metadata["rule"]
            value = getattr(self, item.name)
            if not valid(value):
                raise ValueError(f"{item.name} must be {expected}, got {value!r}")

    def added_needs(self) -> tuple[str, ...]:
        """Calibration statistics these option values add to what the solver always reads."""
        return ()


@dataclass(frozen=True)
class IterativeOptions(Options):
    """Options every iterative solver accepts; ``max_seconds`` stays ``None`` by default, so no
    solver reads the clock and the same inputs give the same factors on any machine."""

    max_iters: int = option(500, int_at_least(0))
    max_seconds: float | None = option(
        None, (lambda v: v is None or (is_number(v) and v > 0), "a number > 0 or None")
    )
    tol: float = option(1e-6, NON_NEGATIVE)
    init: str = option("fwsvd", one_of(*INITS))

    def added_needs(self) -> tuple[str, ...]:
        return KFWSVD_NEEDS if self.init == "kfwsvd" else ()


@dataclass(frozen=True)
class SolverSpec:
    """A solver: its batched implementation, options class, the weighted spectrum its loss curve
    comes from (:mod:`.spectra`) named ``curve``, the calibration statistics it always reads and,
    if iterative, the iterations over which its ``tol`` is measured (``window``)."""

    solve: Callable[[Problem, Any, float], list[SolverOutput]]
    options: type[Options]
    spectrum: Callable[[Problem, Any, bool], Any]
    curve: str
    needs: tuple[str, ...] = ()
    window: int | None = None


def build_problem(
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    rank: int,
    device: torch.device,
    statistics: list[Mapping[str, torch.Tensor]] | None = None,
    names: list[str] | None = None,
) -> Problem:
    """Stack same-shape layers, normalise each; ``statistics`` (one mapping per layer, checked by
    ``factorize_batch``) hold exactly what the solver needs."""
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    weight = torch.stack([w.detach().to(device, dtype) for w in weights])
    importance = torch.stack(
        [
            torch.ones_like(weight[0]) if imp is None else imp.detach().to(device, dtype)
            for imp in importances
        ]
    )
    weight_scale = weight.double().square().mean(dim=(1, 2)).sqrt()
    weight_scale = torch.where(weight_scale > 0, weight_scale, torch.ones_like(weight_scale))
    importance_scale = importance.double().mean(dim=(1, 2))
    importance_scale = torch.where(
        importance_scale > 0, importance_scale, torch.ones_like(importance_scale)
    )
    weight = weight / weight_scale.to(dtype)[:, None, None]
    importance = importance / importance_scale.to(dtype)[:, None, None]
    scale = importance_scale * weight_scale.square()
    stacked, statistic_scale = _stack_statistics(statistics or [], device)
    return Problem(
        weight=weight,
        importance=importance,
        rank=rank,
        scale=scale,
        weight_scale=weight_scale,
        names=list(names) if names is not None else [f"layer {k}" for k in range(len(weights))],
        statistic_scale=statistic_scale,
        **stacked,
    )


def _stack_statistics(
    statistics: list[Mapping[str, torch.Tensor]], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stack each statistic over the layers in float64, divided by its mean diagonal / mean."""
    stacked: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name in statistics[0] if statistics else ():
        # Moments may be float32-asymmetric; the solvers symmetrise their small Gram instead.
        first = statistics[0][name]
        values = torch.empty((len(statistics), *first.shape), dtype=torch.float64, device=device)
        for position, layer in enumerate(statistics):
            values[position].copy_(layer[name].detach())
        scale = (values.diagonal(dim1=1, dim2=2) if values.ndim == 3 else values).mean(dim=1)
        # An all-zero statistic stays zero (the solver falls back to the identity and says so).
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        stacked[name] = values.div_(scale.view(-1, *([1] * (values.ndim - 1))))
        scales[name] = scale.cpu()
    return stacked, scales


#: Relative asymmetry ``max |S − Sᵀ| / max |S|`` a moment may have (float32 accumulation noise).
_SYMMETRY_TOLERANCE = 1e-4


def validate_statistic(name: str, value: Any, shape: tuple[int, ...]) -> str | None:
    """What is wrong with one calibration statistic of one layer, or ``None`` when it is usable."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"{name} must be a floating-point torch.Tensor, got {type(value).__name__}"
    if tuple(value.shape) != shape:
        return f"{name} has shape {tuple(value.shape)}; expected {shape}"
    # min and max propagate NaN: one pass instead of an isfinite mask.
    smallest, largest = (float(v) for v in torch.aminmax(value.detach()))
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        return f"{name} contains NaN or inf; expected finite values"
    if value.ndim == 1:
        if smallest < 0:
            return f"{name} has negative entries (min {smallest:.3g}); expected mean |x| >= 0"
        return None
    if bool((value.diagonal() < 0).any()):
        return f"{name} has a negative diagonal entry; expected a second moment (diagonal >= 0)"
    asymmetry = float((value - value.T).abs().max())
    largest = max(largest, -smallest)
    if asymmetry > _SYMMETRY_TOLERANCE * largest:
        return (
            f"{name} is not symmetric (max |S - Sᵀ| = {asymmetry:.3g}, max |S| = {largest:.3g}); "
            "expected a second moment"
        )
    return None


def batched_loss(
    problem_weight: torch.Tensor, importance: torch.Tensor, product: torch.Tensor
) -> torch.Tensor:
    """Per-layer ``Σ I (W − X)²`` (float64 accumulation) for a batch."""
    residual = problem_weight - product
    return (importance * residual * residual).sum(dim=(1, 2), dtype=torch.float64)


# ----------------------------------------------------------------------------- closed forms


def balanced_truncated_svd(
    matrix: torch.Tensor, rank: int, method: str = "svd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``U√S``, ``√S Vᵀ`` of each matrix in a batch; ``method="gram"``
    (starting points) eigendecomposes the smaller Gram matrix: 3–5× faster, and accurate but for
    pairs near the noise floor."""
    if method == "svd":
        if matrix.shape[1] < matrix.shape[2]:
            # LAPACK's SVD of a wide matrix took 2.2× that of its (tall) transpose on CPU
            # (768 × 3072: 3.3 vs 1.4 s; docs/BENCHMARKS.md): factor Mᵀ = U S Vᵀ, M = V S Uᵀ.
            left_of_t, right_of_t = balanced_truncated_svd(matrix.transpose(1, 2), rank)
            return right_of_t.mT, left_of_t.mT
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:, :rank].sqrt()
        return u[:, :, :rank] * root[:, None, :], root[:, :, None] * vh[:, :rank, :]
    tall = matrix.shape[1] >= matrix.shape[2]
    gram = matrix.transpose(1, 2) @ matrix if tall else matrix @ matrix.transpose(1, 2)
    eigenvalues, eigenvectors = batched_eigh(gram)
    top_values = eigenvalues.flip(-1)[:, :rank]
    top_vectors = eigenvectors.flip(-1)[:, :, :rank]
    singular = top_values.clamp_min(0).sqrt()
    singular = singular.clamp_min(1e-12 * singular[:, :1].clamp_min(1e-30))
    root = singular.sqrt()
    if tall:
        return (matrix @ top_vectors) / root[:, None, :], root[:, :, None] * top_vectors.transpose(
            1, 2
        )
    return top_vectors * root[:, None, :], (top_vectors.transpose(1, 2) @ matrix) / root[:, :, None]


def positive_weights(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Weights made strictly positive so that unscaling never divides by zero: each gets
    ``1e-6 · mean`` over ``dim`` added (a row or column without importance does not count in the
    loss, so any finite value is optimal for it)."""
    mean = weights.mean(dim=dim, keepdim=True)
    floor = 1e-6 * torch.where(mean > 0, mean, torch.ones_like(mean))
    return weights.clamp_min(0) + floor


def fwsvd_factors(
    weight: torch.Tensor, importance: torch.Tensor, rank: int, axis: str, method: str = "svd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Fisher-weighted SVD for a batch: the exact minimiser of
    ``‖D_r^½ (W − AB) D_c^½‖²`` with the importance's column sums (``axis="in"``), row sums
    (``"out"``) or both (``"both"``: ``I ≈ r cᵀ / ΣI``)."""
    rows = positive_weights(importance.sum(dim=2)) if axis in ("out", "both") else None
    cols = positive_weights(importance.sum(dim=1)) if axis in ("in", "both") else None
    scaled = weight
    if rows is not None:
        scaled = scaled * rows.sqrt()[:, :, None]
    if cols is not None:
        scaled = scaled * cols.sqrt()[:, None, :]
    left, right = balanced_truncated_svd(scaled, rank, method)
    if rows is not None:
        left = left / rows.sqrt()[:, :, None]
    if cols is not None:
        right = right / cols.sqrt()[:, None, :]
    return left, right


def initial_factors(
    problem: Problem, init: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting factors for an iterative solver (:data:`INITS`): "best" is the lowest-loss of SVD
    and the three FWSVD forms, "random" Gaussian factors from ``seed`` (product RMS 0.1)."""
    weight, importance, rank = problem.weight, problem.importance, problem.rank
    if init == "kfwsvd":
        truncation = kronecker_truncation(
            weight,
            rank,
            Moment(problem.input_moment, DEFAULT_DAMPING, "input_moment"),
            Moment(problem.output_moment, DEFAULT_DAMPING, "output_moment"),
            problem.names,
        )
        return truncation.left.to(weight.dtype), truncation.right.to(weight.dtype)
    if init == "random":
        generator = torch.Generator().manual_seed(seed)
        batch, out_features, in_features = weight.shape
        std = (0.01 / rank) ** 0.25
        left = torch.randn(batch, out_features, rank, generator=generator, dtype=weight.dtype) * std
        right = torch.randn(batch, rank, in_features, generator=generator, dtype=weight.dtype) * std
        return left.to(weight.device), right.to(weight.device)
    if init == "svd":
        return balanced_truncated_svd(weight, rank, "gram")
    if init in ("fwsvd", "fwsvd_in", "fwsvd_out"):
        axis = {"fwsvd": "both", "fwsvd_in": "in", "fwsvd_out": "out"}[init]
        return fwsvd_factors(weight, importance, rank, axis, "gram")
    # "best", the last of INITS (every option value is checked against them before a solve).
    candidates = [balanced_truncated_svd(weight, rank, "gram")] + [
        fwsvd_factors(weight, importance, rank, axis, "gram") for axis in FWSVD_AXES
    ]
    losses = torch.stack(
        [batched_loss(weight, importance, left @ right) for left, right in candidates]
    )
    best = losses.argmin(dim=0)
    left = torch.stack([candidates[int(k)][0][i] for i, k in enumerate(best)])
    right = torch.stack([candidates[int(k)][1][i] for i, k in enumerate(best)])
    return left, right


# ----------------------------------------------------------------------------- iterative loop


@dataclass(frozen=True, kw_only=True, eq=False)
class Batched:
    """Per-layer tensors of a batch, batch first. :meth:`select` drops the layers that stopped:
    tensor fields are indexed, nested :class:`Batched` fields select in turn, others are kept."""

    def select(self, layers: torch.Tensor) -> Self:
        """The same state restricted to ``layers`` (indices or a boolean mask over the batch)."""
        selected: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                selected[item.name] = value[layers.to(value.device)]
            elif isinstance(value, Batched):
                selected[item.name] = value.select(layers)
        return replace(self, **selected)


@dataclass(frozen=True, kw_only=True, eq=False)
class IterateState(Batched):
    """The state of an iterative solver for the running layers (their slice of the problem);
    each family extends it. The loop advances ``iteration`` before each step, so a step sees its
    own 1-based number (Adam's ``t``)."""

    weight: torch.Tensor
    importance: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    iteration: int = 0

    def info(self, position: int) -> dict[str, Any]:
        """Per-layer facts reported in ``FactorizationResult.info`` for the layer at ``position``."""
        return {}


State = TypeVar("State", bound=IterateState)
#: A step maps the state to the next one and the per-layer loss of the point it was *given*
#: (float64, shape (b,)).
Step = Callable[[State], tuple[State, torch.Tensor]]


def run_iterations(
    state: State, step: Step[State], options: IterativeOptions, started: float, window: int = 1
) -> list[SolverOutput]:
    """Drive ``step`` until each layer stops; return each layer's best iterate.

    A layer stops when its best loss improved by less than ``tol`` (relative) over ``window``
    iterations ("converged"), at ``max_iters`` or ``max_seconds``; it then leaves the batch.
    """
    max_iters, max_seconds = options.max_iters, options.max_seconds
    records = _LayerRecords(state, options.tol, window, started)
    while True:
        if state.iteration >= max_iters:
            records.finish(state, torch.arange(state.left.shape[0]), "max_iters")
            break
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            records.finish(state, torch.arange(state.left.shape[0]), "max_seconds")
            break
        point = state
        state, loss = step(replace(state, iteration=state.iteration + 1))
        done = records.record(point.left, point.right, loss)
        if bool(done.any()):
            records.finish(state, done.nonzero().flatten(), "converged")
            running = (~done).nonzero().flatten()
            if len(running) == 0:
                break
            state = state.select(running)
            records.select(running)
    return [output for output in records.outputs if output is not None]


class _LayerRecords:
    """The loop's bookkeeping. ``active`` maps a running layer's position in the shrinking batch
    to its original index; ``best_*`` are indexed by position, the lists by original index."""

    def __init__(self, state: IterateState, tol: float, window: int, started: float) -> None:
        batch = state.left.shape[0]
        self.tol, self.window, self.started = tol, window, started
        self.initial = (state.left, state.right)
        self.active = torch.arange(batch)
        self.best_left, self.best_right = state.left, state.right
        self.best_loss = torch.full((batch,), float("inf"), dtype=torch.float64)
        self.histories: list[list[tuple[float, float]]] = [[] for _ in range(batch)]
        self.best_traces: list[list[float]] = [[] for _ in range(batch)]
        self.outputs: list[SolverOutput | None] = [None] * batch

    def record(self, left: torch.Tensor, right: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Log the loss of the point (left, right) a step was given; which layers converged."""
        now = time.perf_counter() - self.started
        loss = loss.detach().to("cpu", torch.float64)
        improved = loss < self.best_loss
        if bool(improved.all()):
            # Every layer improved (always, for a monotone solver): keep the points, no copy.
            # Steps never modify the factors they were given, so holding them is safe.
            self.best_left, self.best_right = left, right
        else:
            mask = improved.to(left.device)[:, None, None]
            self.best_left = torch.where(mask, left, self.best_left)
            self.best_right = torch.where(mask, right, self.best_right)
        self.best_loss = torch.where(improved, loss, self.best_loss)
        done = torch.zeros(len(self.active), dtype=torch.bool)
        for position, layer in enumerate(self.active.tolist()):
            self.histories[layer].append((now, float(loss[position])))
            trace = self.best_traces[layer]
            trace.append(float(self.best_loss[position]))
            if len(trace) > self.window:
                earlier, current = trace[-self.window - 1], trace[-1]
                done[position] = earlier - current <= self.tol * abs(earlier) or current == 0.0
        return done

    def finish(self, state: IterateState, positions: torch.Tensor, reason: StopReason) -> None:
        """Measure the current point of the finished layers and emit their best iterate."""
        device_positions = positions.to(state.weight.device)
        final = batched_loss(
            state.weight[device_positions],
            state.importance[device_positions],
            state.left[device_positions] @ state.right[device_positions],
        ).cpu()
        now = time.perf_counter() - self.started
        for index, position in enumerate(positions.tolist()):
            layer = int(self.active[position])
            self.histories[layer].append((now, float(final[index])))
            left, right = self.best_left[position], self.best_right[position]
            if float(final[index]) < float(self.best_loss[position]):
                left, right = state.left[position], state.right[position]
            self.outputs[layer] = SolverOutput(
                left=left,
                right=right,
                history=self.histories[layer],
                iterations=state.iteration,
                stop_reason=reason,
                info=state.info(position),
                initial=(self.initial[0][layer], self.initial[1][layer]),
            )

    def select(self, running: torch.Tensor) -> None:
        """Keep the records of the layers at positions ``running``."""
        device_running = running.to(self.best_left.device)
        self.best_left = self.best_left[device_running]
        self.best_right = self.best_right[device_running]
        self.best_loss = self.best_loss[running]
        self.active = self.active[running]
