"""Full-batch first-order solvers on (A, B): Adam, curvature-bounded SGD, and Adam→SGD (SWATS).

All three work on the normalised problem (weight RMS 1, importance mean 1), so one default step
size serves every layer. Gradients: with ``E = I ∘ (AB − W)``, ``∇_A = 2 E Bᵀ``, ``∇_B = 2 Aᵀ E``.
"""

from __future__ import annotations

from typing import Any

import torch

from weighted_lowrank.lowrank.solvers._common import (
    ITERATIVE_OPTIONS,
    Problem,
    SolverOutput,
    initial_factors,
    run_iterations,
)

ADAM_OPTIONS: dict[str, Any] = {
    **ITERATIVE_OPTIONS,
    "lr": 3e-3,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
}
SGD_OPTIONS: dict[str, Any] = {
    **ITERATIVE_OPTIONS,
    "lr": "auto",
    "momentum": 0.9,
    "power_iters": 20,
}
ADAM_SGD_OPTIONS: dict[str, Any] = {
    **ADAM_OPTIONS,
    "switch_eps": 1e-2,
    "switch_min_iters": 20,
    "power_iters": 20,
}
#: Iterations over which the relative-improvement tolerance is measured (steps are not monotone).
GRADIENT_WINDOW = 20


def loss_and_gradients(
    weight: torch.Tensor, importance: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer loss (float64) and the gradients with respect to ``left`` and ``right``."""
    difference = left @ right - weight
    weighted = importance * difference
    loss = (weighted * difference).sum(dim=(1, 2), dtype=torch.float64)
    return loss, 2 * weighted @ right.transpose(1, 2), 2 * left.transpose(1, 2) @ weighted


def gauss_newton_lambda_max(
    importance: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    iterations: int,
    seed: int,
) -> torch.Tensor:
    """Power-iteration estimate of the largest eigenvalue of the Gauss–Newton matrix ``JᵀDJ``.

    ``J(dA, dB) = dA B + A dB`` and ``D = 2 I``; near a good fit this is the Hessian's top
    eigenvalue, so a step size below ``2 / λ_max`` keeps gradient descent stable.
    """
    # One draw per layer from the same seed, so a layer's estimate does not depend on its batch.
    draws = [
        (
            torch.randn(
                left.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=left.dtype
            ),
            torch.randn(
                right.shape[1:],
                generator=torch.Generator().manual_seed(seed + 1),
                dtype=right.dtype,
            ),
        )
        for _ in range(left.shape[0])
    ]
    direction_left = torch.stack([d[0] for d in draws]).to(left.device)
    direction_right = torch.stack([d[1] for d in draws]).to(right.device)
    estimate = torch.zeros(left.shape[0], dtype=torch.float64, device=left.device)
    for _ in range(max(iterations, 1)):
        norm = (
            direction_left.square().sum(dim=(1, 2)) + direction_right.square().sum(dim=(1, 2))
        ).sqrt()
        norm = norm.clamp_min(torch.finfo(left.dtype).tiny)
        direction_left = direction_left / norm[:, None, None]
        direction_right = direction_right / norm[:, None, None]
        image = 2 * importance * (direction_left @ right + left @ direction_right)
        direction_left = image @ right.transpose(1, 2)
        direction_right = left.transpose(1, 2) @ image
        estimate = (
            (direction_left.square().sum(dim=(1, 2)) + direction_right.square().sum(dim=(1, 2)))
            .sqrt()
            .double()
        )
    return estimate.clamp_min(torch.finfo(torch.float64).tiny)


def _start(problem: Problem, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    left, right = initial_factors(problem, options["init"], options["seed"])
    return {"left": left, "right": right}


def _adam_direction(
    state: dict[str, torch.Tensor],
    grad_left: torch.Tensor,
    grad_right: torch.Tensor,
    count: int,
    options: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Adam moments updated in ``state``; returns (state, step on A, step on B)."""
    beta1, beta2, eps, lr = options["beta1"], options["beta2"], options["eps"], options["lr"]
    moments = {}
    steps = []
    for name, grad in (("left", grad_left), ("right", grad_right)):
        first = beta1 * state[f"m_{name}"] + (1 - beta1) * grad
        second = beta2 * state[f"v_{name}"] + (1 - beta2) * grad * grad
        moments[f"m_{name}"], moments[f"v_{name}"] = first, second
        corrected_first = first / (1 - beta1**count)
        corrected_second = second / (1 - beta2**count)
        steps.append(-lr * corrected_first / (corrected_second.sqrt() + eps))
    return {**state, **moments}, steps[0], steps[1]


def solve_adam(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Full-batch Adam on (A, B) from the closed-form initialisation."""
    state = _start(problem, options)
    for name in ("left", "right"):
        state[f"m_{name}"] = torch.zeros_like(state[name])
        state[f"v_{name}"] = torch.zeros_like(state[name])
    counter = {"count": 0}

    def step(state):
        counter["count"] += 1
        loss, grad_left, grad_right = loss_and_gradients(
            state["weight"], state["importance"], state["left"], state["right"]
        )
        state, step_left, step_right = _adam_direction(
            state, grad_left, grad_right, counter["count"], options
        )
        return {
            **state,
            "left": state["left"] + step_left,
            "right": state["right"] + step_right,
        }, loss

    return run_iterations(problem, state, step, options, started, window=GRADIENT_WINDOW)


def _bounded_sgd_update(state, grad_left, grad_right, loss, momentum, sgd_mask):
    """Heavy-ball SGD with backtracking for the layers in ``sgd_mask``.

    A layer whose loss rose since its previous point returns to that point, halves its step size
    and drops its momentum; the others take ``buf ← μ·buf + g``, ``x ← x − (1 − μ)·lr·buf`` (the
    SWATS form: in steady state the step is ``lr·g``, so ``lr`` compares with Adam's).
    """
    rose = (loss > state["previous_loss"]) & sgd_mask
    keep = sgd_mask & ~rose
    lr = torch.where(rose, state["lr"] / 2, state["lr"])
    rose3 = rose.to(grad_left.device)[:, None, None]
    keep3 = keep.to(grad_left.device)[:, None, None]
    lr3 = lr.to(grad_left.device, grad_left.dtype)[:, None, None]
    buffer_left = torch.where(keep3, momentum * state["buffer_left"] + grad_left, 0.0)
    buffer_right = torch.where(keep3, momentum * state["buffer_right"] + grad_right, 0.0)
    left = torch.where(
        rose3, state["previous_left"], state["left"] - (1 - momentum) * lr3 * buffer_left
    )
    right = torch.where(
        rose3, state["previous_right"], state["right"] - (1 - momentum) * lr3 * buffer_right
    )
    previous_left = torch.where(keep3, state["left"], state["previous_left"])
    previous_right = torch.where(keep3, state["right"], state["previous_right"])
    previous_loss = torch.where(
        keep, loss.to(state["previous_loss"].device), state["previous_loss"]
    )
    return {
        "left": left,
        "right": right,
        "buffer_left": buffer_left,
        "buffer_right": buffer_right,
        "previous_left": previous_left,
        "previous_right": previous_right,
        "previous_loss": previous_loss,
        "lr": lr,
    }


def _sgd_state(
    left: torch.Tensor, right: torch.Tensor, lr: torch.Tensor
) -> dict[str, torch.Tensor]:
    batch = left.shape[0]
    return {
        "buffer_left": torch.zeros_like(left),
        "buffer_right": torch.zeros_like(right),
        "previous_left": left,
        "previous_right": right,
        "previous_loss": torch.full(
            (batch,), float("inf"), dtype=torch.float64, device=left.device
        ),
        "lr": lr,
    }


def solve_sgd(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Full-batch heavy-ball gradient descent with a curvature bound and backtracking.

    ``lr="auto"`` uses ``1 / λ_max`` of the Gauss–Newton matrix at the start (power iteration);
    a number is used as given but still halved whenever the loss rises.
    """
    state = _start(problem, options)
    device = state["left"].device
    if options["lr"] == "auto":
        lambda_max = gauss_newton_lambda_max(
            problem.importance,
            state["left"],
            state["right"],
            options["power_iters"],
            options["seed"],
        )
        lr = 1.0 / lambda_max
    else:
        if not (isinstance(options["lr"], int | float) and options["lr"] > 0):
            raise ValueError(
                f"solver 'sgd': lr must be 'auto' or a number > 0, got {options['lr']!r}"
            )
        lr = torch.full((problem.batch,), float(options["lr"]), dtype=torch.float64, device=device)
    state.update(_sgd_state(state["left"], state["right"], lr.to(device)))
    everyone = torch.ones(problem.batch, dtype=torch.bool, device=device)

    def step(state):
        loss, grad_left, grad_right = loss_and_gradients(
            state["weight"], state["importance"], state["left"], state["right"]
        )
        mask = everyone[: state["left"].shape[0]]
        update = _bounded_sgd_update(state, grad_left, grad_right, loss, options["momentum"], mask)
        return {**state, **update}, loss

    return run_iterations(problem, state, step, options, started, window=GRADIENT_WINDOW)


def solve_adam_sgd(problem: Problem, options: dict[str, Any], started: float) -> list[SolverOutput]:
    """Adam, then heavy-ball SGD from the SWATS switching point (Keskar & Socher 2017).

    After each Adam step ``p`` with gradient ``g``: ``γ = (p·p)/(−p·g)``,
    ``λ ← β₂ λ + (1 − β₂) γ``; switch when ``|λ/(1 − β₂ᵏ) − γ| < switch_eps · λ/(1 − β₂ᵏ)``
    (relative, because the absolute ε of the paper depends on the loss scale) and at least
    ``switch_min_iters`` estimates were averaged (right after the start Adam's steps are nearly
    sign steps whose γ barely changes, which fakes convergence of the estimate). The SGD phase
    uses ``lr = min(λ/(1 − β₂ᵏ), 1/λ_max)`` with ``λ_max`` the Gauss–Newton curvature at the
    switching point, momentum ``beta1`` in the SWATS form, and halves ``lr`` whenever the loss
    rises.
    """
    state = _start(problem, options)
    device = state["left"].device
    batch = problem.batch
    for name in ("left", "right"):
        state[f"m_{name}"] = torch.zeros_like(state[name])
        state[f"v_{name}"] = torch.zeros_like(state[name])
    state.update(
        _sgd_state(
            state["left"], state["right"], torch.zeros(batch, dtype=torch.float64, device=device)
        )
    )

    def per_layer(value: float) -> torch.Tensor:
        return torch.full((batch,), value, dtype=torch.float64, device=device)

    state["swats_average"] = per_layer(0.0)
    state["swats_count"] = per_layer(0.0)
    state["sgd_mode"] = torch.zeros(batch, dtype=torch.bool, device=device)
    state["info_switch_iteration"] = per_layer(-1.0)
    state["info_swats_lr"] = per_layer(-1.0)
    state["info_sgd_lr"] = per_layer(-1.0)
    state["info_lambda_max"] = per_layer(-1.0)
    beta2, switch_eps = options["beta2"], options["switch_eps"]
    switch_min_iters = options["switch_min_iters"]
    counter = {"count": 0}

    def step(state):
        counter["count"] += 1
        loss, grad_left, grad_right = loss_and_gradients(
            state["weight"], state["importance"], state["left"], state["right"]
        )
        sgd_mode = state["sgd_mode"]
        state, adam_left, adam_right = _adam_direction(
            state, grad_left, grad_right, counter["count"], options
        )
        sgd = _bounded_sgd_update(state, grad_left, grad_right, loss, options["beta1"], sgd_mode)
        adam3 = (~sgd_mode)[:, None, None]
        left = torch.where(adam3, state["left"] + adam_left, sgd["left"])
        right = torch.where(adam3, state["right"] + adam_right, sgd["right"])
        # SWATS: the SGD step size that, along Adam's direction, matches Adam's step.
        along = (adam_left * grad_left).sum(dim=(1, 2), dtype=torch.float64) + (
            adam_right * grad_right
        ).sum(dim=(1, 2), dtype=torch.float64)
        length = adam_left.square().sum(dim=(1, 2), dtype=torch.float64) + adam_right.square().sum(
            dim=(1, 2), dtype=torch.float64
        )
        defined = (along < 0) & ~sgd_mode
        gamma = torch.where(defined, length / (-along).clamp_min(1e-300), 0.0)
        average = torch.where(
            defined, beta2 * state["swats_average"] + (1 - beta2) * gamma, state["swats_average"]
        )
        count = state["swats_count"] + defined.double()
        corrected = average / (1 - beta2 ** count.clamp_min(1))
        switch = (
            defined
            & (count >= switch_min_iters)
            & ((corrected - gamma).abs() < switch_eps * corrected)
        )
        new_state = {**state, **{k: v for k, v in sgd.items() if k not in ("left", "right")}}
        new_state.update(left=left, right=right, swats_average=average, swats_count=count)
        if bool(switch.any()):
            lambda_max = gauss_newton_lambda_max(
                state["importance"], left, right, options["power_iters"], options["seed"]
            )
            bounded = torch.minimum(corrected, 1.0 / lambda_max)
            new_state["lr"] = torch.where(switch, bounded, new_state["lr"])
            new_state["sgd_mode"] = sgd_mode | switch
            new_state["previous_loss"] = torch.where(
                switch, float("inf"), new_state["previous_loss"]
            )
            for name in ("left", "right"):
                new_state[f"buffer_{name}"] = torch.where(
                    switch[:, None, None], 0.0, new_state[f"buffer_{name}"]
                )
            new_state["info_switch_iteration"] = torch.where(
                switch, float(counter["count"]), state["info_switch_iteration"]
            )
            new_state["info_swats_lr"] = torch.where(switch, corrected, state["info_swats_lr"])
            new_state["info_sgd_lr"] = torch.where(switch, bounded, state["info_sgd_lr"])
            new_state["info_lambda_max"] = torch.where(switch, lambda_max, state["info_lambda_max"])
        return new_state, loss

    return run_iterations(problem, state, step, options, started, window=GRADIENT_WINDOW)
