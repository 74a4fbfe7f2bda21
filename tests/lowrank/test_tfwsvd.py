"""tfwsvd internals (issue 15): the fused chunked iteration, the rotated preconditioner, workers."""

from __future__ import annotations

import pytest
import torch

from weighted_lowrank.lowrank import devices
from weighted_lowrank.lowrank.solvers import factorize, factorize_batch, tfwsvd
from weighted_lowrank.lowrank.solvers._common import build_problem, initial_factors


def _problem(out_features=30, in_features=20, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    profile = torch.outer(
        torch.rand(out_features, generator=generator, dtype=dtype) ** 2 + 0.05,
        torch.rand(in_features, generator=generator, dtype=dtype) ** 2 + 0.05,
    )
    noise = torch.exp(
        0.8 * torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    )
    return weight, profile * noise


def _state(weight, importance, rank, preconditioner="rotated"):
    """A tfwsvd state at the two-sided start, as ``solve_tfwsvd`` builds it."""
    problem = build_problem([weight], [importance], rank, weight.device)
    captured = {}

    def capture(state, step, options, started, window):
        captured["state"] = state
        return []

    original = tfwsvd.run_iterations
    tfwsvd.run_iterations = capture
    try:
        options = tfwsvd.TfwsvdOptions(preconditioner=preconditioner)
        tfwsvd.solve_tfwsvd(problem, options, 0.0)
    finally:
        tfwsvd.run_iterations = original
    return captured["state"]


def test_line_search_coefficients_are_the_loss_along_the_direction():
    weight, importance = _problem(seed=1)
    state = _state(weight, importance, 4)
    coefficients = tfwsvd._line_search_coefficients(state)[0]
    w, i = state.weight[0], state.importance[0]
    for t in (0.0, 0.3, -0.7, 1.9):
        left = state.left[0] + t * state.dir_left[0]
        right = state.right[0] + t * state.dir_right[0]
        direct = float((i * (left @ right - w).square()).sum())
        polynomial = sum(float(c) * t**k for k, c in enumerate(coefficients))
        assert polynomial == pytest.approx(direct, rel=1e-10)


def test_fused_gradient_equals_the_textbook_gradient():
    weight, importance = _problem(seed=2)
    state = _state(weight, importance, 5)
    w, i, a, b = state.weight[0], state.importance[0], state.left[0], state.right[0]
    weighted = i * (a @ b - w)
    torch.testing.assert_close(state.gradient.grad_left[0], weighted @ b.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.gradient.grad_right[0], a.T @ weighted, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        state.scaled_residual[0], i.sqrt() * (a @ b - w), rtol=1e-10, atol=1e-12
    )


def test_small_chunks_give_the_same_iterates(monkeypatch):
    weights, importances = zip(*[_problem(seed=s) for s in (3, 4, 5)], strict=True)
    whole = factorize_batch(list(weights), list(importances), [4] * 3, max_iters=25, tol=0.0)
    # 37 elements per chunk: row blocks of one layer, uneven at the end.
    monkeypatch.setattr(tfwsvd, "_CPU_CHUNK_ELEMENTS", 37)
    chunked = factorize_batch(list(weights), list(importances), [4] * 3, max_iters=25, tol=0.0)
    for first, second in zip(whole, chunked, strict=True):
        assert first.loss == pytest.approx(second.loss, rel=1e-10)
        torch.testing.assert_close(first.left @ first.right, second.left @ second.right)


def test_chunks_cover_every_element_once():
    workspace = tfwsvd.Workspace(
        chunk_elements=100, buffers=[torch.empty(0)] * 2, line=torch.empty(0)
    )
    for shape in [(3, 30, 20), (5, 7, 9), (1, 50, 3), (2, 1, 500)]:
        covered = torch.zeros(shape, dtype=torch.int64)
        chunks = workspace.chunks(torch.Size(shape))
        for layers, rows in chunks:
            covered[layers, rows] += 1
        assert bool((covered == 1).all()), shape
        assert len(chunks) >= min(2, shape[0] * shape[1])


def test_two_workers_give_the_result_of_one(monkeypatch):
    threads = torch.get_num_threads()
    weights, importances = zip(*[_problem(40, 24, seed=s) for s in (6, 7)], strict=True)
    monkeypatch.setattr(tfwsvd, "_CPU_CHUNK_ELEMENTS", 200)
    with devices.worker_threads(2):
        assert devices.cpu_workers(torch.device("cpu")) == 2
    assert devices.cpu_workers(torch.device("cpu")) == 1
    two = factorize_batch(
        list(weights), list(importances), [5, 5], max_iters=30, tol=0.0, threads=2
    )
    one = factorize_batch(list(weights), list(importances), [5, 5], max_iters=30, tol=0.0)
    assert torch.get_num_threads() == threads
    for first, second in zip(two, one, strict=True):
        assert first.iterations == second.iterations
        assert first.loss == pytest.approx(second.loss, rel=1e-10)


def test_split_batch_equals_one_call():
    generator = torch.Generator().manual_seed(8)
    matrices = torch.randn(5, 6, 6, generator=generator, dtype=torch.float64)
    matrices = matrices @ matrices.transpose(1, 2)
    with devices.worker_threads(2):
        values, vectors = devices.split_batch(torch.linalg.eigh, matrices)
        cholesky = devices.split_batch(torch.linalg.cholesky, matrices)
    expected_values, expected_vectors = torch.linalg.eigh(matrices)
    torch.testing.assert_close(values, expected_values)
    torch.testing.assert_close(vectors.abs(), expected_vectors.abs())
    torch.testing.assert_close(cholesky, torch.linalg.cholesky(matrices))


def test_rotated_preconditioner_is_the_separable_one_for_a_separable_importance():
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(16, 12, generator=generator, dtype=torch.float64)
    importance = torch.outer(
        torch.rand(16, generator=generator, dtype=torch.float64) + 0.1,
        torch.rand(12, generator=generator, dtype=torch.float64) + 0.1,
    )
    problem = build_problem([weight], [importance], 3, weight.device)
    left, right = initial_factors(problem, "fwsvd")
    rotated = tfwsvd.RotatedPreconditioner.start(problem.importance, left, right)
    separable = tfwsvd.Preconditioner.start(problem.importance, left, right)
    grad_left = torch.randn(left.shape, generator=generator, dtype=torch.float64)
    grad_right = torch.randn(right.shape, generator=generator, dtype=torch.float64)
    for got, expected in zip(
        rotated.apply(grad_left, grad_right), separable.apply(grad_left, grad_right), strict=True
    ):
        # Equal up to the relative floors (1e-6 on d, 1e-7 ridge on the Grams).
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)


def test_rotated_preconditioner_is_exact_for_one_row_block():
    # One output row: its Hessian block B diag(I_0) Bᵀ is diagonal in some basis, which the
    # rotated basis finds exactly when the profile statistics see the only row.
    weight, importance = _problem(1, 12, seed=10)
    problem = build_problem([weight], [importance], 1, weight.device)
    left, right = initial_factors(problem, "fwsvd")
    rotated = tfwsvd.RotatedPreconditioner.start(problem.importance, left, right)
    hessian = (right * problem.importance[0, 0]) @ right.transpose(1, 2)
    gradient = torch.randn(1, 1, 1, dtype=torch.float64)
    direction, _ = rotated.apply(gradient, torch.zeros_like(right))
    # Up to the relative floor (1e-6 × the mean) that ``positive_weights`` adds to every diagonal entry.
    torch.testing.assert_close(
        direction, gradient @ torch.linalg.inv(hessian), rtol=1e-5, atol=1e-12
    )


@pytest.mark.parametrize("preconditioner", ["rotated", "separable"])
def test_converged_tfwsvd_satisfies_the_first_order_condition(preconditioner):
    weight, importance = _problem(seed=11)
    result = factorize(
        weight, importance, 4, preconditioner=preconditioner, max_iters=800, tol=1e-15
    )
    weighted = importance * (result.left @ result.right - weight)
    scale = float((importance * weight.square()).sum()) ** 0.5
    assert float((weighted @ result.right.T).norm()) < 1e-6 * scale
    assert float((result.left.T @ weighted).norm()) < 1e-6 * scale


def test_rotated_preconditioner_needs_fewer_iterations_on_a_non_separable_importance():
    weight, importance = _problem(60, 40, seed=12)
    optimum = factorize(weight, importance, 8, max_iters=1000, tol=1e-15).loss

    def iterations_to_reach(preconditioner):
        result = factorize(
            weight, importance, 8, preconditioner=preconditioner, max_iters=400, tol=0.0
        )
        losses = [loss for _, loss in result.history]
        return next(k for k, loss in enumerate(losses) if loss <= optimum * (1 + 1e-4))

    assert iterations_to_reach("rotated") < iterations_to_reach("separable")


def test_preconditioner_option_is_checked():
    weight, importance = _problem(seed=13)
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        factorize(weight, importance, 3, solver="tfwsvd", preconditioner="exact")


def test_tfwsvd_is_deterministic():
    weight, importance = _problem(seed=14, dtype=torch.float32)
    first = factorize(weight, importance, 4)
    second = factorize(weight, importance, 4)
    assert first.iterations == second.iterations
    assert torch.equal(first.left, second.left) and torch.equal(first.right, second.right)
