"""Full-batch first-order solvers on (A, B): Adam, curvature-bounded SGD, and Adam→SGD (SWATS).

All three work on the normalised problem (weight RMS 1, importance mean 1), so one default step
size serves every layer. Gradients: with ``E = I ∘ (AB − W)``, ``∇_A = 2 E Bᵀ``, ``∇_B = 2 Aᵀ E``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from weighted_lowrank.lowrank.solvers._common import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Batched,
    IterateState,
    IterativeOptions,
    Problem,
    SolverOutput,
    SolverSpec,
    initial_factors,
    int_at_least,
    is_number,
    option,
    run_iterations,
)
from weighted_lowrank.lowrank.solvers.spectra import PROXY_CURVE, proxy_spectrum


# Stopping defaults measured on the default model's Fisher (docs/METHOD.md, "Stopping"): tol 3e-4
# over 20 iterations stops Adam (and adam_sgd) past its plateau; SGD at 1/λ_max still improves
# after 3,000 iterations, so 50 is the cap that fits the default run's time.
@dataclass(frozen=True)
class AdamOptions(IterativeOptions):
    max_iters: int = option(1000, int_at_least(0))
    tol: float = option(3e-4, NON_NEGATIVE)
    lr: float = option(3e-3, POSITIVE)
    beta1: float = option(0.9, FRACTION)
    beta2: float = option(0.999, FRACTION)
    eps: float = option(1e-8, POSITIVE)


@dataclass(frozen=True)
class SgdOptions(IterativeOptions):
    """``lr="auto"``: 1 / λ_max of the Gauss–Newton matrix at the start."""

    max_iters: int = option(50, int_at_least(0))
    tol: float = option(1e-4, NON_NEGATIVE)
    lr: float | str = option(
        "auto", (lambda v: v == "auto" or (is_number(v) and v > 0), "a number > 0 or 'auto'")
    )
    momentum: float = option(0.9, FRACTION)
    power_iters: int = option(20, int_at_least(1))


@dataclass(frozen=True)
class AdamSgdOptions(AdamOptions):
    switch_eps: float = option(1e-2, (NON_NEGATIVE[0], "a number >= 0 (0: never switch)"))
    switch_min_iters: int = option(20, int_at_least(1))
    power_iters: int = option(20, int_at_least(1))


#: Iterations over which the relative-improvement tolerance is measured (steps are not monotone).
GRADIENT_WINDOW = 20


def loss_and_gradients(state: IterateState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer loss (float64) at the state's factors and the gradients on ``left``, ``right``."""
    left, right = state.left, state.right
    difference = left @ right - state.weight
    weighted = state.importance * difference
    loss = (weighted * difference).sum(dim=(1, 2), dtype=torch.float64)
    return loss, 2 * weighted @ right.transpose(1, 2), 2 * left.transpose(1, 2) @ weighted


def _squared_norm(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per layer, ``‖first‖² + ‖second‖²`` of a pair of (b, ·, ·) factors."""
    return first.square().sum(dim=(1, 2)) + second.square().sum(dim=(1, 2))


def gauss_newton_lambda_max(
    importance: torch.Tensor, left: torch.Tensor, right: torch.Tensor, iterations: int, seed: int
) -> torch.Tensor:
    """Power-iteration estimate of the top eigenvalue of the Gauss–Newton matrix ``JᵀDJ``
    (``J(dA, dB) = dA B + A dB``, ``D = 2 I``): steps below ``2 / λ_max`` keep descent stable."""

    # One draw per layer from the same seed, so a layer's estimate does not depend on its batch.
    def draws(factor: torch.Tensor, offset: int) -> torch.Tensor:
        generator = torch.Generator()
        return torch.stack(
            [
                torch.randn(
                    factor.shape[1:],
                    generator=generator.manual_seed(seed + offset),
                    dtype=factor.dtype,
                )
                for _ in range(factor.shape[0])
            ]
        ).to(factor.device)

    direction_left, direction_right = draws(left, 0), draws(right, 1)
    estimate = torch.zeros(left.shape[0], dtype=torch.float64, device=left.device)
    for _ in range(max(iterations, 1)):
        norm = _squared_norm(direction_left, direction_right).sqrt()
        norm = norm.clamp_min(torch.finfo(left.dtype).tiny)
        direction_left = direction_left / norm[:, None, None]
        direction_right = direction_right / norm[:, None, None]
        image = 2 * importance * (direction_left @ right + left @ direction_right)
        direction_left = image @ right.transpose(1, 2)
        direction_right = left.transpose(1, 2) @ image
        estimate = _squared_norm(direction_left, direction_right).sqrt().double()
    return estimate.clamp_min(torch.finfo(torch.float64).tiny)


@dataclass(frozen=True, kw_only=True, eq=False)
class AdamMoments(Batched):
    """Adam's running first (``m``) and second (``v``) moments of the gradients of A and B."""

    m_left: torch.Tensor
    m_right: torch.Tensor
    v_left: torch.Tensor
    v_right: torch.Tensor

    @classmethod
    def zeros(cls, left: torch.Tensor, right: torch.Tensor) -> AdamMoments:
        return cls(
            m_left=torch.zeros_like(left),
            m_right=torch.zeros_like(right),
            v_left=torch.zeros_like(left),
            v_right=torch.zeros_like(right),
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class HeavyBallMemory(Batched):
    """What backtracking heavy-ball SGD remembers: momentum buffers, the last accepted point
    (to return to when the loss rises) with its loss, and each layer's step size."""

    buffer_left: torch.Tensor
    buffer_right: torch.Tensor
    previous_left: torch.Tensor
    previous_right: torch.Tensor
    previous_loss: torch.Tensor
    lr: torch.Tensor

    @classmethod
    def start(cls, left: torch.Tensor, right: torch.Tensor, lr: torch.Tensor) -> HeavyBallMemory:
        batch = left.shape[0]
        return cls(
            buffer_left=torch.zeros_like(left),
            buffer_right=torch.zeros_like(right),
            previous_left=left,
            previous_right=right,
            previous_loss=torch.full(
                (batch,), float("inf"), dtype=torch.float64, device=left.device
            ),
            lr=lr,
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class AdamState(IterateState):
    moments: AdamMoments


@dataclass(frozen=True, kw_only=True, eq=False)
class SgdState(IterateState):
    memory: HeavyBallMemory


@dataclass(frozen=True, kw_only=True, eq=False)
class SwatsState(IterateState):
    """Adam→SGD (SWATS): both memories, the exponential average of the projected step size γ
    (``swats_average``, over ``swats_count`` values) and each layer's switch; the switch record
    (iteration, SWATS estimate, SGD's step size, the curvature bound) counts where ``sgd_mode``."""

    moments: AdamMoments
    memory: HeavyBallMemory
    swats_average: torch.Tensor
    swats_count: torch.Tensor
    sgd_mode: torch.Tensor
    switch_iteration: torch.Tensor
    swats_lr: torch.Tensor
    sgd_lr: torch.Tensor
    lambda_max: torch.Tensor

    def info(self, position: int) -> dict[str, Any]:
        """The layer's switch to SGD; ``None`` for each entry when it never switched."""
        if not bool(self.sgd_mode[position]):
            return {"switch_iteration": None, "swats_lr": None, "sgd_lr": None, "lambda_max": None}
        return {
            "switch_iteration": int(self.switch_iteration[position]),
            "swats_lr": float(self.swats_lr[position]),
            "sgd_lr": float(self.sgd_lr[position]),
            "lambda_max": float(self.lambda_max[position]),
        }


def _adam_direction(
    state: AdamState | SwatsState,
    grad_left: torch.Tensor,
    grad_right: torch.Tensor,
    options: AdamOptions,
) -> tuple[AdamMoments, torch.Tensor, torch.Tensor]:
    """Adam's moments after step number ``state.iteration``, and its steps on A and B."""
    beta1, beta2, count = options.beta1, options.beta2, state.iteration

    def update(first: torch.Tensor, second: torch.Tensor, grad: torch.Tensor) -> tuple:
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        corrected_first = first / (1 - beta1**count)
        corrected_second = second / (1 - beta2**count)
        return (
            first,
            second,
            -options.lr * corrected_first / (corrected_second.sqrt() + options.eps),
        )

    m_left, v_left, step_left = update(state.moments.m_left, state.moments.v_left, grad_left)
    m_right, v_right, step_right = update(state.moments.m_right, state.moments.v_right, grad_right)
    updated = AdamMoments(m_left=m_left, m_right=m_right, v_left=v_left, v_right=v_right)
    return updated, step_left, step_right


def solve_adam(problem: Problem, options: AdamOptions, started: float) -> list[SolverOutput]:
    """Full-batch Adam on (A, B) from the closed-form initialisation."""
    left, right = initial_factors(problem, options.init, options.seed)
    state = AdamState(
        weight=problem.weight,
        importance=problem.importance,
        left=left,
        right=right,
        moments=AdamMoments.zeros(left, right),
    )

    def step(state: AdamState) -> tuple[AdamState, torch.Tensor]:
        loss, grad_left, grad_right = loss_and_gradients(state)
        moments, step_left, step_right = _adam_direction(state, grad_left, grad_right, options)
        return replace(
            state, left=state.left + step_left, right=state.right + step_right, moments=moments
        ), loss

    return run_iterations(state, step, options, started, window=GRADIENT_WINDOW)


def _bounded_sgd_update(
    state: SgdState | SwatsState,
    grad_left: torch.Tensor,
    grad_right: torch.Tensor,
    loss: torch.Tensor,
    momentum: float,
    sgd_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, HeavyBallMemory]:
    """Heavy-ball SGD with backtracking for the layers in ``sgd_mask``; returns (A, B, memory).
    A layer whose loss rose returns to its previous point, halves its step size and drops its
    momentum; the others take ``buf ← μ·buf + g``, ``x ← x − (1 − μ)·lr·buf`` (SWATS' form)."""
    memory, left, right = state.memory, state.left, state.right
    rose = (loss > memory.previous_loss) & sgd_mask
    keep = sgd_mask & ~rose
    lr = torch.where(rose, memory.lr / 2, memory.lr)
    rose3 = rose.to(grad_left.device)[:, None, None]
    keep3 = keep.to(grad_left.device)[:, None, None]
    lr3 = lr.to(grad_left.device, grad_left.dtype)[:, None, None]
    buffer_left = torch.where(keep3, momentum * memory.buffer_left + grad_left, 0.0)
    buffer_right = torch.where(keep3, momentum * memory.buffer_right + grad_right, 0.0)
    new_left = torch.where(rose3, memory.previous_left, left - (1 - momentum) * lr3 * buffer_left)
    new_right = torch.where(
        rose3, memory.previous_right, right - (1 - momentum) * lr3 * buffer_right
    )
    updated = HeavyBallMemory(
        buffer_left=buffer_left,
        buffer_right=buffer_right,
        previous_left=torch.where(keep3, left, memory.previous_left),
        previous_right=torch.where(keep3, right, memory.previous_right),
        previous_loss=torch.where(keep, loss.to(memory.previous_loss.device), memory.previous_loss),
        lr=lr,
    )
    return new_left, new_right, updated


def solve_sgd(problem: Problem, options: SgdOptions, started: float) -> list[SolverOutput]:
    """Full-batch heavy-ball gradient descent with backtracking, at ``1 / λ_max`` of the start's
    Gauss–Newton matrix (``lr="auto"``) or the given ``lr``, halved whenever the loss rises."""
    left, right = initial_factors(problem, options.init, options.seed)
    device = left.device
    if options.lr == "auto":
        lambda_max = gauss_newton_lambda_max(
            problem.importance, left, right, options.power_iters, options.seed
        )
        lr = 1.0 / lambda_max
    else:
        lr = torch.full((problem.batch,), float(options.lr), dtype=torch.float64, device=device)
    state = SgdState(
        weight=problem.weight,
        importance=problem.importance,
        left=left,
        right=right,
        memory=HeavyBallMemory.start(left, right, lr.to(device)),
    )

    def step(state: SgdState) -> tuple[SgdState, torch.Tensor]:
        loss, grad_left, grad_right = loss_and_gradients(state)
        everyone = torch.ones(state.left.shape[0], dtype=torch.bool, device=state.left.device)
        left, right, memory = _bounded_sgd_update(
            state, grad_left, grad_right, loss, options.momentum, everyone
        )
        return replace(state, left=left, right=right, memory=memory), loss

    return run_iterations(state, step, options, started, window=GRADIENT_WINDOW)


def solve_adam_sgd(problem: Problem, options: AdamSgdOptions, started: float) -> list[SolverOutput]:
    """Adam, then heavy-ball SGD from the SWATS switching point (Keskar & Socher 2017).

    After each Adam step ``p`` with gradient ``g``: ``γ = (p·p)/(−p·g)``, ``λ ← β₂ λ + (1 − β₂) γ``;
    switch when ``|λ/(1 − β₂ᵏ) − γ| < switch_eps · λ/(1 − β₂ᵏ)`` (relative: the paper's absolute ε
    depends on the loss scale) after at least ``switch_min_iters`` estimates (Adam's first,
    sign-like steps fake a settled γ). SGD then runs at ``min(λ/(1 − β₂ᵏ), 1/λ_max)`` (Gauss–Newton
    curvature at the switch), momentum ``beta1``, halving ``lr`` whenever the loss rises.
    """
    # Adam from the initial factors; no layer has switched yet.
    left, right = initial_factors(problem, options.init, options.seed)
    zeros = torch.zeros(problem.batch, dtype=torch.float64, device=left.device)
    state = SwatsState(
        weight=problem.weight,
        importance=problem.importance,
        left=left,
        right=right,
        moments=AdamMoments.zeros(left, right),
        memory=HeavyBallMemory.start(left, right, zeros),
        swats_average=zeros,
        swats_count=zeros,
        sgd_mode=torch.zeros(problem.batch, dtype=torch.bool, device=left.device),
        switch_iteration=torch.zeros(problem.batch, dtype=torch.int64, device=left.device),
        swats_lr=zeros,
        sgd_lr=zeros,
        lambda_max=zeros,
    )

    def step(state: SwatsState) -> tuple[SwatsState, torch.Tensor]:
        loss, grad_left, grad_right = loss_and_gradients(state)
        moments, adam_left, adam_right = _adam_direction(state, grad_left, grad_right, options)
        sgd_left, sgd_right, memory = _bounded_sgd_update(
            state, grad_left, grad_right, loss, options.beta1, state.sgd_mode
        )
        adam3 = (~state.sgd_mode)[:, None, None]
        new_state = replace(
            state,
            left=torch.where(adam3, state.left + adam_left, sgd_left),
            right=torch.where(adam3, state.right + adam_right, sgd_right),
            moments=moments,
            memory=memory,
        )
        new_state = _swats_estimate(
            new_state, adam_left, adam_right, grad_left, grad_right, options
        )
        return new_state, loss

    return run_iterations(state, step, options, started, window=GRADIENT_WINDOW)


def _swats_estimate(
    state: SwatsState,
    adam_left: torch.Tensor,
    adam_right: torch.Tensor,
    grad_left: torch.Tensor,
    grad_right: torch.Tensor,
    options: AdamSgdOptions,
) -> SwatsState:
    """Fold this Adam step into the SWATS estimate (γ: the SGD step size that matches Adam's step
    ``p`` along it) and switch the layers where it settled."""
    beta2 = options.beta2

    def dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return (first * second).sum(dim=(1, 2), dtype=torch.float64)

    along = dot(adam_left, grad_left) + dot(adam_right, grad_right)
    length = adam_left.square().sum(dim=(1, 2), dtype=torch.float64) + adam_right.square().sum(
        dim=(1, 2), dtype=torch.float64
    )
    defined = (along < 0) & ~state.sgd_mode
    gamma = torch.where(defined, length / (-along).clamp_min(1e-300), 0.0)
    average = torch.where(
        defined, beta2 * state.swats_average + (1 - beta2) * gamma, state.swats_average
    )
    count = state.swats_count + defined.double()
    corrected = average / (1 - beta2 ** count.clamp_min(1))
    switch = (
        defined
        & (count >= options.switch_min_iters)
        & ((corrected - gamma).abs() < options.switch_eps * corrected)
    )
    state = replace(state, swats_average=average, swats_count=count)
    if bool(switch.any()):
        state = _switch_to_sgd(state, switch, corrected, options)
    return state


def _switch_to_sgd(
    state: SwatsState, switch: torch.Tensor, corrected: torch.Tensor, options: AdamSgdOptions
) -> SwatsState:
    """Start SGD on the ``switch`` layers: bounded step size, fresh memory, switch recorded."""
    lambda_max = gauss_newton_lambda_max(
        state.importance, state.left, state.right, options.power_iters, options.seed
    )
    bounded = torch.minimum(corrected, 1.0 / lambda_max)
    memory = replace(
        state.memory,
        lr=torch.where(switch, bounded, state.memory.lr),
        previous_loss=torch.where(switch, float("inf"), state.memory.previous_loss),
        buffer_left=torch.where(switch[:, None, None], 0.0, state.memory.buffer_left),
        buffer_right=torch.where(switch[:, None, None], 0.0, state.memory.buffer_right),
    )
    return replace(
        state,
        memory=memory,
        sgd_mode=state.sgd_mode | switch,
        switch_iteration=torch.where(switch, state.iteration, state.switch_iteration),
        swats_lr=torch.where(switch, corrected, state.swats_lr),
        sgd_lr=torch.where(switch, bounded, state.sgd_lr),
        lambda_max=torch.where(switch, lambda_max, state.lambda_max),
    )


SPECS = {
    name: SolverSpec(solve, options, proxy_spectrum, PROXY_CURVE, window=GRADIENT_WINDOW)
    for name, solve, options in [
        ("adam", solve_adam, AdamOptions),
        ("sgd", solve_sgd, SgdOptions),
        ("adam_sgd", solve_adam_sgd, AdamSgdOptions),
    ]
}
