"""The calibrated closed forms ``kfwsvd``, ``svd_llm`` and ``asvd``: each is the exact minimiser of
its own quadratic, they reduce to one another on identity statistics, and degenerate statistics
are damped, replaced or rejected as documented."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.conftest import make_tiny_bundle
from weighted_lowrank.lowrank import factorize_model, select_linear_modules, solver_needs
from weighted_lowrank.lowrank.solvers import (
    _REGISTRY,
    factorize,
    factorize_batch,
)
from weighted_lowrank.lowrank.solvers.calibrated import ASVD_FLOOR

DOUBLE = torch.float64
DAMPING = 1e-6  # the solvers' default, relative to the mean diagonal


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=_generator(seed), dtype=DOUBLE)


def _moment(size: int, seed: int, samples: int | None = None) -> torch.Tensor:
    """A second moment X Xᵀ / k with uneven scales (rank-deficient when ``samples < size``)."""
    generator = _generator(seed)
    samples = 2 * size if samples is None else samples
    factor = torch.randn(size, samples, generator=generator, dtype=DOUBLE)
    factor = factor * (0.2 + torch.rand(size, 1, generator=generator, dtype=DOUBLE) * 3)
    return factor @ factor.T / samples


def _abs_mean(size: int, seed: int) -> torch.Tensor:
    return torch.rand(size, generator=_generator(seed), dtype=DOUBLE) * 2 + 0.05


def _damped(moment: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """The moment the solvers use: ``damping · mean(diag) · I`` added."""
    return moment + damping * moment.diagonal().mean() * torch.eye(len(moment), dtype=DOUBLE)


def _asvd_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    scale = abs_mean**alpha
    return scale + ASVD_FLOOR * scale.mean()


def _quadratic(delta: torch.Tensor, output: torch.Tensor, input_: torch.Tensor) -> torch.Tensor:
    """``vec(ΔW)ᵀ (G ⊗ A) vec(ΔW)`` with row-major vec — the full Kronecker-weighted problem."""
    flat = delta.reshape(-1)
    return flat @ torch.kron(output, input_) @ flat


def _quadratic_of(solver: str, stats: dict, out_features: int, in_features: int, alpha=0.5):
    """(G, A) of the quadratic each solver minimises, damped as documented."""
    eye_out = torch.eye(out_features, dtype=DOUBLE)
    if solver == "kfwsvd":
        return _damped(stats["output_moment"]), _damped(stats["input_moment"])
    if solver == "svd_llm":
        return eye_out, _damped(stats["input_moment"])
    return eye_out, torch.diag(_asvd_scale(stats["input_abs_mean"], alpha) ** 2)


def _statistics(out_features: int, in_features: int, seed: int) -> dict[str, torch.Tensor]:
    return {
        "input_moment": _moment(in_features, seed),
        "output_moment": _moment(out_features, seed + 1),
        "input_abs_mean": _abs_mean(in_features, seed + 2),
    }


def _generic_minimum(weight, output, input_, rank, starts=8, seed=0) -> float:
    """Best quadratic loss of L-BFGS from many random starts (float64)."""
    out_features, in_features = weight.shape
    losses = []
    for start in range(starts):
        generator = _generator(1000 * seed + start)
        left = torch.randn(out_features, rank, generator=generator, dtype=DOUBLE)
        right = torch.randn(rank, in_features, generator=generator, dtype=DOUBLE)
        losses.append(_lbfgs(weight, output, input_, left, right))
    return min(losses)


def _lbfgs(weight, output, input_, left, right) -> float:
    left, right = left.requires_grad_(), right.requires_grad_()
    optimizer = torch.optim.LBFGS(
        [left, right],
        max_iter=3000,
        tolerance_grad=1e-13,
        tolerance_change=1e-18,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = _quadratic(weight - left @ right, output, input_)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(_quadratic(weight - left @ right, output, input_))


def test_row_major_vec_pairs_kron_output_with_input():
    weight_delta = _weight(4, 3, 0)
    output, input_ = _moment(4, 1), _moment(3, 2)
    trace = torch.trace(weight_delta.T @ output @ weight_delta @ input_)
    assert float(_quadratic(weight_delta, output, input_)) == pytest.approx(float(trace), rel=1e-12)


CASES = [(4, 3, 1), (4, 3, 2), (3, 4, 2), (6, 5, 2), (5, 7, 3)]


@pytest.mark.parametrize("solver", ["kfwsvd", "svd_llm", "asvd"])
@pytest.mark.parametrize(("out_features", "in_features", "rank"), CASES)
def test_closed_form_is_the_exact_minimiser_of_its_quadratic(
    solver, out_features, in_features, rank
):
    seed = out_features * 10 + in_features + rank
    weight = _weight(out_features, in_features, seed)
    stats = _statistics(out_features, in_features, seed)
    output, input_ = _quadratic_of(solver, stats, out_features, in_features)
    result = factorize(weight, None, rank, solver, statistics=stats)
    left = result.left.clone().requires_grad_()
    right = result.right.clone().requires_grad_()
    closed = _quadratic(weight - left @ right, output, input_)
    closed.backward()
    closed = float(closed.detach())
    generic = _generic_minimum(weight, output, input_, rank, seed=seed)
    assert closed <= generic * (1 + 1e-8)
    assert generic <= closed * (1 + 1e-6)  # the generic search found the same optimum
    scale = float(_quadratic(weight, output, input_)) / weight.norm()
    assert float(left.grad.norm()) <= 1e-8 * scale
    assert float(right.grad.norm()) <= 1e-8 * scale


def _sphere(points: int) -> torch.Tensor:
    """A Fibonacci grid of unit vectors in R³ (a dense search over directions)."""
    index = torch.arange(points, dtype=DOUBLE) + 0.5
    polar = torch.arccos(1 - 2 * index / points)
    azimuth = math.pi * (1 + 5**0.5) * index
    return torch.stack(
        [polar.sin() * azimuth.cos(), polar.sin() * azimuth.sin(), polar.cos()], dim=1
    )


def _brute_force(weight, output, input_, rank, points=40_000) -> float:
    """Minimum over a dense grid of row spaces (3 input columns) of the quadratic, the left factor
    solved exactly for each: rank 1 spans a grid direction, rank 2 the plane normal to it."""
    directions = _sphere(points)
    if rank == 1:
        bases = directions[:, None, :]
    else:
        helper = torch.where(
            directions[:, :1].abs() < 0.9,
            torch.tensor([1.0, 0.0, 0.0], dtype=DOUBLE),
            torch.tensor([0.0, 1.0, 0.0], dtype=DOUBLE),
        )
        first = torch.linalg.cross(directions, helper)
        first = first / first.norm(dim=1, keepdim=True)
        bases = torch.stack([first, torch.linalg.cross(directions, first)], dim=1)
    out_features = weight.shape[0]
    fisher = torch.kron(output, input_)
    # vec(left @ basis) = kron(I, basisᵀ) vec(left): linear in left, so left is a least squares.
    eye = torch.eye(out_features, dtype=DOUBLE)
    design = torch.einsum("ab,pkj->pajbk", eye, bases).reshape(len(bases), 3 * out_features, -1)
    target = weight.reshape(-1)
    normal = design.transpose(1, 2) @ fisher @ design
    rhs = design.transpose(1, 2) @ (fisher @ target)
    left = torch.linalg.solve(normal, rhs)
    residual = target - (design @ left[:, :, None]).squeeze(-1)
    losses = ((residual @ fisher) * residual).sum(dim=1)
    return float(losses.min())


@pytest.mark.parametrize("solver", ["kfwsvd", "svd_llm", "asvd"])
@pytest.mark.parametrize(("out_features", "rank"), [(3, 1), (3, 2), (4, 1), (4, 2)])
def test_closed_form_beats_a_dense_brute_force_search(solver, out_features, rank):
    weight = _weight(out_features, 3, 7 + rank)
    stats = _statistics(out_features, 3, 3 * rank)
    output, input_ = _quadratic_of(solver, stats, out_features, 3)
    result = factorize(weight, None, rank, solver, statistics=stats)
    closed = float(_quadratic(weight - result.left @ result.right, output, input_))
    brute = _brute_force(weight, output, input_, rank)
    assert closed <= brute * (1 + 1e-8)
    # The grid is fine enough to come close (relative to the loss of dropping the whole weight).
    assert brute - closed <= 1e-3 * float(_quadratic(weight, output, input_))


def _product(result) -> torch.Tensor:
    return result.left @ result.right


def test_identity_statistics_reduce_kfwsvd_to_svd_llm_to_svd():
    weight = _weight(9, 6, 3)
    svd = factorize(weight, None, 3, "svd")
    moment = _moment(6, 4)
    eye_in, eye_out = torch.eye(6, dtype=DOUBLE), torch.eye(9, dtype=DOUBLE)
    llm_identity = factorize(weight, None, 3, "svd_llm", statistics={"input_moment": eye_in})
    torch.testing.assert_close(_product(llm_identity), _product(svd), rtol=0, atol=1e-10)
    llm = factorize(weight, None, 3, "svd_llm", statistics={"input_moment": moment})
    kf = factorize(
        weight,
        None,
        3,
        "kfwsvd",
        statistics={"input_moment": moment, "output_moment": 3.0 * eye_out},
    )
    torch.testing.assert_close(_product(kf), _product(llm), rtol=0, atol=1e-10)
    both = factorize(
        weight, None, 3, "kfwsvd", statistics={"input_moment": eye_in, "output_moment": eye_out}
    )
    torch.testing.assert_close(_product(both), _product(svd), rtol=0, atol=1e-10)


def test_asvd_with_alpha_zero_is_svd_and_follows_asvds_rule_otherwise():
    weight = _weight(8, 6, 5)
    abs_mean = _abs_mean(6, 6)
    abs_mean[2] = 0.0  # a channel that is always zero: floored, not divided by
    svd = factorize(weight, None, 3, "svd")
    flat = factorize(weight, None, 3, "asvd", alpha=0, statistics={"input_abs_mean": abs_mean})
    torch.testing.assert_close(_product(flat), _product(svd), rtol=0, atol=1e-10)
    result = factorize(weight, None, 3, "asvd", statistics={"input_abs_mean": abs_mean})
    scale = abs_mean**0.5
    scale = scale + 1e-6 * scale.mean()
    u, s, vh = torch.linalg.svd(weight * scale, full_matrices=False)
    expected = (u[:, :3] * s[:3]) @ (vh[:3] / scale)
    # Column 2 is divided by its 1e-6 floor, which amplifies rounding ~1e6-fold there.
    torch.testing.assert_close(_product(result), expected, rtol=0, atol=1e-8)
    assert torch.isfinite(result.right).all() and result.info["alpha"] == 0.5


def test_svd_llm_is_truncation_aware():
    weight = _weight(10, 7, 8)
    moment = _moment(7, 9)
    rank = 3
    result = factorize(weight, None, rank, "svd_llm", statistics={"input_moment": moment})
    root = torch.linalg.cholesky(_damped(moment))
    singular = torch.linalg.svdvals(weight @ root)
    whitened_loss = (weight - _product(result)) @ root
    assert float(whitened_loss.square().sum()) == pytest.approx(
        float(singular[rank:].square().sum()), rel=1e-10
    )


def test_info_reports_each_objective_in_the_statistics_units():
    weight = 7.0 * _weight(6, 5, 10)
    stats = _statistics(6, 5, 11)
    scaled = {name: 1000.0 * value for name, value in stats.items()}
    for solver, key in (
        ("kfwsvd", "kronecker_loss"),
        ("svd_llm", "activation_loss"),
        ("asvd", "scaled_loss"),
    ):
        base = factorize(weight, None, 2, solver, statistics=stats)
        big = factorize(weight, None, 2, solver, statistics=scaled)
        # Normalising the statistics leaves the minimiser unchanged ...
        torch.testing.assert_close(_product(big), _product(base), rtol=0, atol=1e-9)
        delta = weight - _product(big)
        if solver == "kfwsvd":
            expected = torch.trace(
                delta.T @ scaled["output_moment"] @ delta @ scaled["input_moment"]
            )
        elif solver == "svd_llm":
            expected = torch.trace(delta @ scaled["input_moment"] @ delta.T)
        else:
            expected = (delta * _asvd_scale(scaled["input_abs_mean"], 0.5)).square().sum()
        # ... and the reported objective is in the units of the statistics as given (undamped).
        assert big.info[key] == pytest.approx(float(expected), rel=1e-9), solver
        assert big.loss == pytest.approx(float(delta.square().sum()), rel=1e-10), solver
        assert big.stop_reason == "exact" and big.iterations == 0


def test_factor_pairs_are_balanced():
    weight = _weight(12, 8, 12)
    for solver in ("kfwsvd", "svd_llm", "asvd"):
        result = factorize(weight, None, 4, solver, statistics=_statistics(12, 8, 13))
        torch.testing.assert_close(
            result.left.norm(dim=0), result.right.norm(dim=1), rtol=1e-10, atol=0
        )


@pytest.mark.parametrize(("out_features", "in_features"), [(8, 6), (6, 8)])
def test_singular_and_zero_moments_give_finite_damped_factors(out_features, in_features):
    weight = _weight(out_features, in_features, 14)
    singular_in = _moment(in_features, 15, samples=2)  # rank 2
    singular_in[1, :] = singular_in[:, 1] = 0.0  # an input that is always 0
    singular_out = _moment(out_features, 16, samples=1)  # rank 1
    result = factorize(
        weight,
        None,
        3,
        "kfwsvd",
        statistics={"input_moment": singular_in, "output_moment": singular_out},
    )
    assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()
    assert result.info["damping_input"] == DAMPING and result.info["damping_output"] == DAMPING
    assert not result.info["input_identity_fallback"]
    # The damped quadratic is what was minimised: the textbook closed form (both Cholesky
    # factors, a full SVD, explicit inverses) gives the same optimum.
    output, input_ = _damped(singular_out), _damped(singular_in)
    root_out, root_in = torch.linalg.cholesky(output), torch.linalg.cholesky(input_)
    u, s, vh = torch.linalg.svd(root_out.T @ weight @ root_in)
    textbook = (
        torch.linalg.inv(root_out.T) @ (u[:, :3] * s[:3]) @ vh[:3] @ torch.linalg.inv(root_in)
    )
    closed = float(_quadratic(weight - _product(result), output, input_))
    # Nearly all of W lies where the damped moments are ~1e-6: judge against the whole scale.
    scale = float(_quadratic(weight, output, input_))
    assert closed == pytest.approx(float(s[3:].square().sum()), abs=1e-12 * scale)
    assert closed <= float(_quadratic(weight - textbook, output, input_)) + 1e-12 * scale


def test_an_input_that_is_always_zero_costs_nothing_and_does_not_disturb_the_rest():
    weight = _weight(9, 6, 17)
    moment = _moment(6, 18)
    moment[4, :] = moment[:, 4] = 0.0
    result = factorize(weight, None, 2, "svd_llm", statistics={"input_moment": moment})
    kept = [0, 1, 2, 3, 5]
    reduced = factorize(
        weight[:, kept].contiguous(),
        None,
        2,
        "svd_llm",
        statistics={"input_moment": moment[kept][:, kept].contiguous()},
    )
    assert result.info["activation_loss"] == pytest.approx(
        reduced.info["activation_loss"], rel=1e-4
    )
    assert torch.isfinite(result.right).all() and float(result.right.abs().max()) < 1e3


def test_an_all_zero_moment_falls_back_to_the_identity_and_says_so():
    weight = _weight(7, 5, 19)
    svd = factorize(weight, None, 2, "svd")
    zero = torch.zeros(5, 5, dtype=DOUBLE)
    result = factorize(weight, None, 2, "svd_llm", statistics={"input_moment": zero})
    torch.testing.assert_close(_product(result), _product(svd), rtol=0, atol=1e-10)
    assert result.info["input_identity_fallback"] and result.info["activation_loss"] == 0.0
    kf = factorize(
        weight,
        None,
        2,
        "kfwsvd",
        statistics={"input_moment": _moment(5, 20), "output_moment": torch.zeros(7, 7)},
    )
    assert kf.info["output_identity_fallback"] and not kf.info["input_identity_fallback"]
    assert torch.isfinite(kf.left).all() and torch.isfinite(kf.right).all()


def test_a_failing_cholesky_raises_the_damping_tenfold_until_it_succeeds():
    weight = _weight(8, 5, 21)
    moment = _moment(5, 22)
    moment = moment / moment.diagonal().mean()
    eigenvalues, vectors = torch.linalg.eigh(moment)
    # Slightly indefinite (float32 accumulation noise can do this): λ_min = −3e-5 · mean diag.
    eigenvalues[0] = -3e-5
    noisy = vectors @ torch.diag(eigenvalues) @ vectors.T
    result = factorize(weight, None, 2, "svd_llm", statistics={"input_moment": noisy})
    assert result.info["damping_input"] == pytest.approx(1e-4)
    assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()
    broken = moment.clone()  # positive diagonal, but λ_min ≈ −4 · mean diag: not a moment
    broken[0, 1] = broken[1, 0] = 5.0 * float(moment.diagonal().max())
    with pytest.raises(ValueError, match=r"input_moment of layer 'layer 1' is not positive"):
        factorize_batch(
            [weight, weight],
            [None, None],
            [2, 2],
            "svd_llm",
            statistics=[{"input_moment": moment}, {"input_moment": broken}],
        )


@pytest.mark.parametrize(
    ("statistics", "message"),
    [
        ({"input_moment": torch.full((5, 5), float("nan"))}, r"'attn': input_moment contains NaN"),
        (
            {"input_moment": torch.eye(4)},
            r"'attn': input_moment has shape \(4, 4\); expected \(5, 5\)",
        ),
        ({"input_moment": torch.triu(torch.ones(5, 5))}, r"'attn': input_moment is not symmetric"),
        ({"output_moment": torch.eye(6)}, r"needs input_moment for \['attn'\]"),
        (None, r"needs input_moment for \['attn'\]"),
    ],
)
def test_bad_or_missing_statistics_name_the_layer(statistics, message):
    weight = _weight(6, 5, 23)
    with pytest.raises(ValueError, match=message):
        factorize_batch([weight], [None], [2], "svd_llm", statistics=[statistics], names=["attn"])


def test_factorize_batch_equals_per_layer_calls():
    shapes = [(8, 6), (8, 6), (8, 6), (6, 8)]
    weights = [_weight(out, inp, 30 + k) for k, (out, inp) in enumerate(shapes)]
    stats = [_statistics(out, inp, 40 + 3 * k) for k, (out, inp) in enumerate(shapes)]
    stats[1]["output_moment"] = torch.zeros(8, 8, dtype=DOUBLE)  # a fallback inside a batch
    for solver in ("kfwsvd", "svd_llm", "asvd"):
        batched = factorize_batch(weights, [None] * 4, [3] * 4, solver, statistics=stats)
        for weight, layer_stats, result in zip(weights, stats, batched, strict=True):
            single = factorize(weight, None, 3, solver, statistics=layer_stats)
            torch.testing.assert_close(_product(result), _product(single), rtol=0, atol=1e-10)
            assert result.info == pytest.approx(single.info, rel=1e-9)


def test_iterative_solvers_can_start_from_the_kronecker_closed_form():
    weight = _weight(10, 7, 50)
    importance = torch.rand(10, 7, generator=_generator(51), dtype=DOUBLE) + 0.1
    stats = _statistics(10, 7, 52)
    assert solver_needs("tfwsvd") == ()
    assert solver_needs("tfwsvd", init="kfwsvd") == ("input_moment", "output_moment")
    closed = factorize(weight, importance, 3, "kfwsvd", statistics=stats)
    started = factorize(
        weight, importance, 3, "als", init="kfwsvd", max_iters=5, tol=0.0, statistics=stats
    )
    assert started.initial_loss == pytest.approx(closed.loss, rel=1e-9)
    assert started.loss <= started.initial_loss
    with pytest.raises(ValueError, match=r"'als' needs input_moment"):
        factorize(weight, importance, 3, "als", init="kfwsvd")


def test_solver_needs_lists_each_solvers_statistics():
    assert solver_needs("kfwsvd") == ("input_moment", "output_moment")
    assert solver_needs("svd_llm") == ("input_moment",)
    assert solver_needs("asvd") == ("input_abs_mean",)
    assert solver_needs("svd") == () and solver_needs("fwsvd") == ()
    with pytest.raises(ValueError, match="unknown solver"):
        solver_needs("nope")
    with pytest.raises(ValueError, match=r"'asvd': alpha must be a number in \[0, 2\]"):
        solver_needs("asvd", alpha=3.0)


def _model_statistics(model) -> dict[str, torch.Tensor]:
    stats = {}
    for seed, (name, module) in enumerate(select_linear_modules(model).items()):
        stats[f"{name}.input_moment"] = _moment(module.in_features, seed).float()
        stats[f"{name}.output_moment"] = _moment(module.out_features, seed + 100).float()
        stats[f"{name}.input_abs_mean"] = _abs_mean(module.in_features, seed + 200).float()
    return stats


def test_factorize_model_uses_the_prefixed_statistics_in_float32():
    model = make_tiny_bundle().model
    stats = _model_statistics(model)
    for solver in ("kfwsvd", "svd_llm", "asvd"):
        results = factorize_model(model, None, 0.5, solver, statistics=stats)
        assert list(results) == list(select_linear_modules(model))
        for result in results.values():
            assert result.left.dtype == torch.float32 and torch.isfinite(result.left).all()
            assert result.stop_reason == "exact"


def test_factorize_model_checks_every_statistic_before_any_work(monkeypatch):
    model = make_tiny_bundle().model
    stats = _model_statistics(model)
    calls = []

    def spy(problem, options, started):
        calls.append(problem.names)
        raise AssertionError("no solve may start")

    spec = _REGISTRY["kfwsvd"]
    monkeypatch.setitem(_REGISTRY, "kfwsvd", dataclasses.replace(spec, solve=spy))
    names = list(select_linear_modules(model))
    missing = dict(stats)
    del missing[f"{names[-1]}.output_moment"]
    with pytest.raises(
        ValueError,
        match=rf"'kfwsvd' needs output_moment for \['{names[-1]}'\] .*'<module>.output_moment'.*fisher_estimation",
    ):
        factorize_model(model, None, 0.5, "kfwsvd", statistics=missing)
    with pytest.raises(ValueError, match=r"'kfwsvd' needs input_moment"):
        factorize_model(model, None, 0.5, "kfwsvd")
    wrong = dict(stats)
    wrong[f"{names[-1]}.input_moment"] = torch.eye(3)
    with pytest.raises(ValueError, match=rf"layer '{names[-1]}': input_moment has shape \(3, 3\)"):
        factorize_model(model, None, 0.5, "kfwsvd", statistics=wrong)
    assert calls == []
