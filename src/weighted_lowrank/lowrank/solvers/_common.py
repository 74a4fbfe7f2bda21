"""Machinery shared by the solver families: batched problems, options, closed forms, the loop.

Every solver works on a *batch* of same-shape layers at once (``(b, out, in)`` tensors), so that
``factorize_batch`` shares matmuls between layers; ``factorize`` is a batch of one. Inside a
batch each layer is normalised — weight by its RMS, importance by its mean — which leaves every
minimiser unchanged and lets one set of default step sizes serve every layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: Options every solver accepts.
COMMON_OPTIONS: dict[str, Any] = {"device": None, "seed": 0}
#: Options every iterative solver accepts, with their defaults.
ITERATIVE_OPTIONS: dict[str, Any] = {
    **COMMON_OPTIONS,
    "max_iters": 500,
    "max_seconds": None,
    "tol": 1e-6,
    "init": "fwsvd",
}
#: Initialisations an iterative solver may start from.
INITS = ("fwsvd", "fwsvd_in", "fwsvd_out", "svd", "best", "random")
#: Axes of the closed-form Fisher-weighted SVD.
FWSVD_AXES = ("in", "out", "both")


@dataclass
class Problem:
    """A batch of normalised same-shape problems: loss_original = scale · loss_normalised."""

    weight: torch.Tensor
    importance: torch.Tensor
    rank: int
    scale: torch.Tensor
    weight_scale: torch.Tensor

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
    info: dict[str, Any] = field(default_factory=dict)
    initial: tuple[torch.Tensor, torch.Tensor] | None = None


def resolve_options(
    solver: str, options: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Merge user options over the solver's defaults; unknown names are a ``ValueError``."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"solver {solver!r} got unknown option(s) {unknown}; it accepts {sorted(defaults)}"
        )
    merged = {**defaults, **options}
    if "max_iters" in merged:
        value = merged["max_iters"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"solver {solver!r}: max_iters must be an int >= 0, got {value!r}")
    if merged.get("max_seconds") is not None and not merged["max_seconds"] > 0:
        raise ValueError(
            f"solver {solver!r}: max_seconds must be > 0 or None, got {merged['max_seconds']!r}"
        )
    if "tol" in merged and not (isinstance(merged["tol"], int | float) and merged["tol"] >= 0):
        raise ValueError(f"solver {solver!r}: tol must be a number >= 0, got {merged['tol']!r}")
    if "init" in merged and merged["init"] not in INITS:
        raise ValueError(f"solver {solver!r}: init must be one of {INITS}, got {merged['init']!r}")
    if "axis" in merged and merged["axis"] not in FWSVD_AXES:
        raise ValueError(
            f"solver {solver!r}: axis must be one of {FWSVD_AXES}, got {merged['axis']!r}"
        )
    seed = merged.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"solver {solver!r}: seed must be an int, got {seed!r}")
    return merged


def build_problem(
    weights: list[torch.Tensor],
    importances: list[torch.Tensor | None],
    rank: int,
    device: torch.device,
) -> Problem:
    """Stack same-shape layers, normalise each (weight RMS 1, importance mean 1)."""
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
    return Problem(
        weight=weight,
        importance=importance,
        rank=rank,
        scale=scale,
        weight_scale=weight_scale,
    )


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
    """Best rank-``rank`` factors ``U√S``, ``√S Vᵀ`` of each matrix in a batch.

    ``method="gram"`` takes the eigenvectors of the smaller Gram matrix instead of a full SVD:
    3–5× faster, and accurate for the leading singular pairs (it squares the condition number,
    which only hurts pairs near the noise floor); used for starting points of iterative solvers.
    """
    if method == "svd":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:, :rank].sqrt()
        return u[:, :, :rank] * root[:, None, :], root[:, :, None] * vh[:, :rank, :]
    tall = matrix.shape[1] >= matrix.shape[2]
    gram = matrix.transpose(1, 2) @ matrix if tall else matrix @ matrix.transpose(1, 2)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
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


def positive_weights(weights: torch.Tensor, relative_floor: float = 1e-6) -> torch.Tensor:
    """Row/column weights made strictly positive so that unscaling never divides by zero.

    A row (column) whose importance sums to zero gets a tiny weight ``relative_floor · mean``:
    its entries do not count in the loss, so any finite value is optimal for them.
    """
    mean = weights.mean(dim=-1, keepdim=True)
    floor = relative_floor * torch.where(mean > 0, mean, torch.ones_like(mean))
    return weights.clamp_min(0) + floor


def fwsvd_factors(
    weight: torch.Tensor, importance: torch.Tensor, rank: int, axis: str, method: str = "svd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Fisher-weighted SVD for a batch.

    ``axis="in"``: one weight per input column (importance summed over outputs);
    ``axis="out"``: one weight per output row; ``axis="both"``: importance approximated by the
    product of its marginals ``I ≈ r cᵀ / ΣI`` (the rank-one fit that keeps both marginal sums).
    Minimises ``‖D_r^½ (W − AB) D_c^½‖²`` exactly: scale, truncated SVD, unscale.
    """
    if axis not in FWSVD_AXES:
        raise ValueError(f"fwsvd axis must be one of {FWSVD_AXES}, got {axis!r}")
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
    """Starting factors for an iterative solver (see :data:`INITS`).

    "fwsvd" is the two-sided closed form, "best" the lowest-loss of SVD and the three FWSVD
    forms, "random" small Gaussian factors drawn from ``seed`` (product RMS 0.1 of the weight's).
    """
    weight, importance, rank = problem.weight, problem.importance, problem.rank
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
    if init == "best":
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
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


# ----------------------------------------------------------------------------- iterative loop

#: A step maps the state (dict of batch-first tensors, including "left" and "right") to the new
#: state and the per-layer loss of the point it was *given* (float64, shape (b,)).
Step = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], torch.Tensor]]


def run_iterations(
    problem: Problem,
    state: dict[str, torch.Tensor],
    step: Step,
    options: dict[str, Any],
    started: float,
    window: int = 1,
) -> list[SolverOutput]:
    """Drive ``step`` until each layer stops; return each layer's best iterate.

    A layer stops when its best loss improved by less than ``tol`` (relative) over the last
    ``window`` iterations, after ``max_iters`` steps, or when ``max_seconds`` have elapsed for
    the batch. Stopped layers leave the batch so the remaining ones run on smaller matmuls.
    State keys starting with ``info_`` are per-layer scalars reported in ``info`` (negative
    values mean "did not happen" and become ``None``).
    """
    batch = problem.batch
    max_iters, max_seconds, tol = options["max_iters"], options["max_seconds"], options["tol"]
    state = {**state, "weight": problem.weight, "importance": problem.importance}
    initial = (state["left"], state["right"])
    histories: list[list[tuple[float, float]]] = [[] for _ in range(batch)]
    best_traces: list[list[float]] = [[] for _ in range(batch)]
    outputs: list[SolverOutput | None] = [None] * batch
    active = torch.arange(batch)
    best_left, best_right = state["left"], state["right"]
    best_loss = torch.full((batch,), float("inf"), dtype=torch.float64)
    iterations = 0

    def finish(positions: torch.Tensor) -> None:
        """Measure the current point of the finished layers and emit their best iterate."""
        device_positions = positions.to(problem.weight.device)
        final = batched_loss(
            state["weight"][device_positions],
            state["importance"][device_positions],
            state["left"][device_positions] @ state["right"][device_positions],
        ).cpu()
        now = time.perf_counter() - started
        for index, position in enumerate(positions.tolist()):
            layer = int(active[position])
            histories[layer].append((now, float(final[index])))
            left, right = best_left[position], best_right[position]
            if float(final[index]) < float(best_loss[position]):
                left, right = state["left"][position], state["right"][position]
            info = {
                key[len("info_") :]: (
                    None if float(value[position]) < 0 else value[position].item()
                )
                for key, value in state.items()
                if key.startswith("info_")
            }
            outputs[layer] = SolverOutput(
                left=left,
                right=right,
                history=histories[layer],
                iterations=iterations,
                info=info,
                initial=(initial[0][layer], initial[1][layer]),
            )

    while True:
        out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
        if iterations >= max_iters or out_of_time:
            finish(torch.arange(len(active)))
            break
        point_left, point_right = state["left"], state["right"]
        state, loss = step(state)
        now = time.perf_counter() - started
        loss = loss.detach().to("cpu", torch.float64)
        improved = loss < best_loss
        mask = improved.to(point_left.device)[:, None, None]
        best_left = torch.where(mask, point_left, best_left)
        best_right = torch.where(mask, point_right, best_right)
        best_loss = torch.where(improved, loss, best_loss)
        iterations += 1
        done = torch.zeros(len(active), dtype=torch.bool)
        for position, layer in enumerate(active.tolist()):
            histories[layer].append((now, float(loss[position])))
            trace = best_traces[layer]
            trace.append(float(best_loss[position]))
            if len(trace) > window:
                earlier, current = trace[-window - 1], trace[-1]
                done[position] = earlier - current <= tol * abs(earlier) or current == 0.0
        if bool(done.any()):
            finish(done.nonzero().flatten())
            keep = (~done).nonzero().flatten()
            if len(keep) == 0:
                break
            device_keep = keep.to(problem.weight.device)
            state = {key: value[device_keep] for key, value in state.items()}
            best_left, best_right = best_left[device_keep], best_right[device_keep]
            best_loss = best_loss[keep]
            active = active[keep]
    return [output for output in outputs if output is not None]
