"""Weighted low-rank solvers: optimality of the closed forms, properties of the iterative ones."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from weighted_lowrank.lowrank.objective import weighted_loss
from weighted_lowrank.lowrank.solvers import (
    SOLVERS,
    STOPPING_WINDOWS,
    check_solver_options,
    factorize,
    factorize_batch,
    solver_options,
)
from weighted_lowrank.lowrank.solvers._common import Batched, IterateState, balanced_truncated_svd
from weighted_lowrank.lowrank.solvers.als import AlsState
from weighted_lowrank.lowrank.solvers.em import EmState
from weighted_lowrank.lowrank.solvers.gradient import (
    AdamState,
    SgdState,
    SwatsState,
)
from weighted_lowrank.lowrank.solvers.tfwsvd import TfwsvdState


def _problem(out_features=24, in_features=16, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=dtype)
    importance = torch.rand(out_features, in_features, generator=generator, dtype=dtype) ** 4
    return weight, importance


def _trailing_energy(matrix: torch.Tensor, rank: int) -> float:
    singular = torch.linalg.svdvals(matrix.double())
    return float(singular[rank:].square().sum())


def test_svd_reaches_the_eckart_young_optimum():
    weight, _ = _problem()
    result = factorize(weight, None, 5, solver="svd")
    assert result.left.shape == (24, 5) and result.right.shape == (5, 16)
    assert result.loss == pytest.approx(_trailing_energy(weight, 5), rel=1e-10)
    assert result.loss == pytest.approx(
        weighted_loss(weight, None, result.left, result.right), rel=1e-12
    )
    assert result.solver == "svd" and result.rank == 5 and result.history


def test_svd_loss_under_an_importance_is_weighted():
    weight, importance = _problem()
    result = factorize(weight, importance, 5, solver="svd")
    assert result.loss == pytest.approx(
        weighted_loss(weight, importance, result.left, result.right)
    )


@pytest.mark.parametrize("axis", ["in", "out", "both"])
def test_fwsvd_is_exact_when_the_importance_matches_its_axis(axis):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    rows = torch.rand(20, generator=generator, dtype=torch.float64) + 0.1
    cols = torch.rand(12, generator=generator, dtype=torch.float64) + 0.1
    if axis == "in":
        rows = torch.ones_like(rows)
    if axis == "out":
        cols = torch.ones_like(cols)
    importance = rows[:, None] * cols[None, :]
    result = factorize(weight, importance, 4, solver="fwsvd", axis=axis)
    optimum = _trailing_energy(rows.sqrt()[:, None] * weight * cols.sqrt()[None, :], 4)
    assert result.loss == pytest.approx(optimum, rel=1e-9)
    assert result.info == {"axis": axis}


def test_fwsvd_default_axis_is_two_sided_and_beats_svd_on_separable_importance():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    importance = (
        torch.outer(
            torch.rand(16, generator=generator), torch.rand(16, generator=generator)
        ).double()
        ** 2
    )
    two_sided = factorize(weight, importance, 3, solver="fwsvd")
    assert two_sided.info["axis"] == "both"
    for other in (
        factorize(weight, importance, 3, solver="svd"),
        factorize(weight, importance, 3, solver="fwsvd", axis="in"),
        factorize(weight, importance, 3, solver="fwsvd", axis="out"),
    ):
        assert two_sided.loss <= other.loss * (1 + 1e-12)


def test_fwsvd_handles_rows_and_columns_of_zero_importance():
    weight, importance = _problem()
    importance[3] = 0
    importance[:, 5] = 0
    for axis in ("in", "out", "both"):
        result = factorize(weight, importance, 4, solver="fwsvd", axis=axis)
        assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()
        assert result.loss < weighted_loss(
            weight, importance, torch.zeros(24, 4), torch.zeros(4, 16)
        )


def test_closed_forms_keep_dtype_and_device_of_the_weight():
    weight = torch.randn(12, 10)
    result = factorize(weight, torch.rand(12, 10), 3, solver="fwsvd", device="cpu")
    assert result.left.dtype == torch.float32 and result.left.device == weight.device


def test_factorize_batch_equals_per_layer_calls_for_closed_forms():
    problems = [_problem(24, 16, seed) for seed in range(3)] + [_problem(16, 24, 9)]
    weights = [w for w, _ in problems]
    importances = [imp for _, imp in problems]
    importances[1] = None
    ranks = [5, 5, 4, 5]
    batched = factorize_batch(weights, importances, ranks, solver="fwsvd", axis="in")
    for weight, importance, rank, result in zip(weights, importances, ranks, batched, strict=True):
        single = factorize(weight, importance, rank, solver="fwsvd", axis="in")
        assert result.rank == rank
        assert result.loss == pytest.approx(single.loss, rel=1e-9)
        torch.testing.assert_close(result.left @ result.right, single.left @ single.right)


def test_registry_lists_every_required_solver():
    for name in ("svd", "fwsvd", "adam", "sgd", "adam_sgd", "als", "em", "tfwsvd"):
        assert name in SOLVERS


def test_public_package_exports_the_solver_api():
    import weighted_lowrank.lowrank as lowrank

    assert lowrank.factorize is factorize and lowrank.SOLVERS == SOLVERS
    assert lowrank.factorize_batch is factorize_batch
    assert lowrank.weighted_loss is weighted_loss


ITERATIVE = ("adam", "sgd", "adam_sgd", "als", "em", "tfwsvd")
#: Enough iterations for each solver to converge on the small test problems below.
CONVERGED = {
    "adam": {"max_iters": 4000, "tol": 1e-12, "lr": 1e-2},
    "sgd": {"max_iters": 4000, "tol": 1e-12},
    "adam_sgd": {"max_iters": 4000, "tol": 1e-12, "lr": 1e-2},
    "als": {"max_iters": 3000, "tol": 1e-14},
    "em": {"max_iters": 3000, "tol": 1e-14},
    "tfwsvd": {"max_iters": 500, "tol": 1e-14},
}


@pytest.mark.parametrize("solver", ITERATIVE)
def test_uniform_importance_reaches_the_svd_optimum_from_a_random_start(solver):
    weight, _ = _problem(16, 12, seed=3)
    optimum = factorize(weight, None, 3, solver="svd").loss
    result = factorize(weight, None, 3, solver=solver, init="random", seed=1, **CONVERGED[solver])
    assert result.initial_loss > 1.5 * optimum
    assert result.loss <= optimum * (1 + 1e-4)


@pytest.mark.parametrize("solver", ["als", "tfwsvd"])
def test_separable_importance_reaches_the_two_sided_closed_form(solver):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(18, 14, generator=generator, dtype=torch.float64)
    rows = torch.rand(18, generator=generator, dtype=torch.float64) ** 3 + 0.01
    cols = torch.rand(14, generator=generator, dtype=torch.float64) ** 3 + 0.01
    importance = torch.outer(rows, cols)
    exact = factorize(weight, importance, 4, solver="fwsvd", axis="both").loss
    optimum = _trailing_energy(rows.sqrt()[:, None] * weight * cols.sqrt()[None, :], 4)
    assert exact == pytest.approx(optimum, rel=1e-9)
    result = factorize(weight, importance, 4, solver=solver, init="svd", **CONVERGED[solver])
    assert result.initial_loss > 1.05 * exact
    assert result.loss <= exact * (1 + 1e-4)


@pytest.mark.parametrize("solver", ["als", "em", "tfwsvd"])
def test_monotone_solvers_never_increase_the_loss(solver):
    weight, importance = _problem()
    importance[2] = 0
    importance[:, 7] = 0
    result = factorize(weight, importance, 4, solver=solver, max_iters=60, tol=0.0)
    losses = [loss for _, loss in result.history]
    assert len(losses) == 61
    assert all(
        later <= earlier * (1 + 1e-12) for earlier, later in zip(losses, losses[1:], strict=False)
    )
    assert losses[-1] < losses[0]
    times = [seconds for seconds, _ in result.history]
    assert times == sorted(times)


@pytest.mark.parametrize("solver", ITERATIVE)
@pytest.mark.parametrize("init", ["fwsvd", "svd"])
def test_iterative_solvers_end_at_or_below_their_initialisation(solver, init):
    weight, importance = _problem(seed=5)
    result = factorize(weight, importance, 4, solver=solver, init=init, max_iters=40)
    start = factorize(weight, importance, 4, solver="svd" if init == "svd" else "fwsvd")
    assert result.initial_loss == pytest.approx(start.loss, rel=1e-6)
    assert result.loss <= result.initial_loss
    assert result.loss == pytest.approx(
        weighted_loss(weight, importance, result.left, result.right), rel=1e-12
    )
    assert result.history[0][1] == pytest.approx(result.initial_loss, rel=1e-6)


@pytest.mark.parametrize("solver", ITERATIVE)
def test_iterative_solvers_improve_on_every_closed_form_for_a_peaked_importance(solver):
    weight, importance = _problem(seed=6)
    closed = [factorize(weight, importance, 4, solver="svd").loss] + [
        factorize(weight, importance, 4, solver="fwsvd", axis=axis).loss
        for axis in ("in", "out", "both")
    ]
    options = {"max_iters": 300} if solver != "adam" else {"max_iters": 300, "lr": 1e-2}
    result = factorize(weight, importance, 4, solver=solver, init="best", **options)
    assert result.loss < min(closed)


def test_tfwsvd_is_the_default_and_matches_a_long_als_run():
    # Fisher-like importance: a row × column profile times element-wise log-normal noise.
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(30, 20, generator=generator, dtype=torch.float64)
    profile = torch.outer(
        torch.rand(30, generator=generator, dtype=torch.float64) ** 2 + 0.05,
        torch.rand(20, generator=generator, dtype=torch.float64) ** 2 + 0.05,
    )
    importance = profile * torch.exp(
        0.7 * torch.randn(30, 20, generator=generator, dtype=torch.float64)
    )
    default = factorize(weight, importance, 5)
    assert default.solver == "tfwsvd"
    reference = factorize(weight, importance, 5, solver="als", max_iters=5000, tol=1e-14)
    two_sided = factorize(weight, importance, 5, solver="fwsvd").loss
    assert default.loss < two_sided
    assert default.loss <= reference.loss * (1 + 1e-3)


def test_adam_sgd_switches_to_sgd_and_records_the_switch():
    weight, importance = _problem(seed=8)
    result = factorize(weight, importance, 4, solver="adam_sgd", max_iters=1500, tol=0.0, lr=1e-2)
    switch = result.info["switch_iteration"]
    assert isinstance(switch, int) and 20 <= switch < 1500
    assert 0 < result.info["sgd_lr"] <= result.info["swats_lr"]
    assert result.info["sgd_lr"] <= 1 / result.info["lambda_max"] * (1 + 1e-9)
    assert result.loss < result.initial_loss


def test_adam_sgd_without_a_switch_reports_none():
    weight, importance = _problem(seed=8)
    result = factorize(weight, importance, 4, solver="adam_sgd", max_iters=5, switch_eps=0.0)
    assert result.info == dict.fromkeys(("switch_iteration", "swats_lr", "sgd_lr", "lambda_max"))


def test_sgd_step_is_bounded_by_the_curvature():
    weight, importance = _problem(seed=9)
    importance[0, 0] = 500.0
    bounded = factorize(weight, importance, 4, solver="sgd", max_iters=200, tol=0.0)
    reckless = factorize(weight, importance, 4, solver="sgd", max_iters=200, tol=0.0, lr=10.0)
    assert bounded.loss < bounded.initial_loss
    assert reckless.loss <= reckless.initial_loss
    assert all(torch.isfinite(t).all() for t in (reckless.left, reckless.right))


@pytest.mark.parametrize("solver", ITERATIVE)
def test_same_seed_gives_identical_factors(solver):
    weight, importance = _problem(seed=10)
    runs = [
        factorize(weight, importance, 3, solver=solver, init="random", seed=seed, max_iters=25)
        for seed in (4, 4, 5)
    ]
    torch.testing.assert_close(runs[0].left, runs[1].left, rtol=0, atol=0)
    torch.testing.assert_close(runs[0].right, runs[1].right, rtol=0, atol=0)
    assert not torch.equal(runs[0].left, runs[2].left)


@pytest.mark.parametrize("solver", ITERATIVE)
def test_default_stopping_is_deterministic_and_never_reads_the_clock(solver):
    # Issue 11: by default a solver stops on its tolerance or max_iters only, so two runs on the
    # same inputs (same threads) give bit-identical factors and the same iteration counts.
    defaults = solver_options(solver)
    assert defaults["max_seconds"] is None
    assert defaults["max_iters"] >= 1 and defaults["tol"] > 0
    problems = [_problem(24, 16, seed, dtype=torch.float32) for seed in (30, 31)]
    weights = [w for w, _ in problems] + [problems[0][0].T.contiguous()]
    importances = [imp for _, imp in problems] + [problems[0][1].T.contiguous()]
    runs = [factorize_batch(weights, importances, [4, 4, 4], solver=solver) for _ in range(2)]
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first.left, second.left) and torch.equal(first.right, second.right)
        assert first.iterations == second.iterations
        assert first.stop_reason == second.stop_reason != "max_seconds"
        assert first.loss == second.loss


def test_als_keeps_rows_without_importance_where_they_are():
    weight, importance = _problem()
    importance[4] = 0
    start = factorize(weight, importance, 4, solver="als", max_iters=0)
    result = factorize(weight, importance, 4, solver="als", max_iters=20, tol=0.0)
    torch.testing.assert_close(result.left[4], start.left[4], rtol=1e-6, atol=1e-9)
    assert torch.isfinite(result.left).all() and torch.isfinite(result.right).all()


def test_als_satisfies_the_first_order_condition_at_convergence():
    weight, importance = _problem(seed=11)
    result = factorize(weight, importance, 4, solver="als", max_iters=2000, tol=1e-14)
    weighted = importance * (result.left @ result.right - weight)
    gradient_left = weighted @ result.right.T
    gradient_right = result.left.T @ weighted
    scale = float((importance * weight.square()).sum()) ** 0.5
    assert float(gradient_left.norm()) < 1e-5 * scale
    assert float(gradient_right.norm()) < 1e-5 * scale


@pytest.mark.parametrize("solver", ITERATIVE)
def test_factorize_batch_equals_per_layer_calls_for_iterative_solvers(solver):
    problems = [_problem(20, 12, seed) for seed in (12, 13)]
    weights = [w for w, _ in problems] + [problems[0][0].T.contiguous()]
    importances = [imp for _, imp in problems] + [problems[0][1].T.contiguous()]
    ranks = [3, 3, 3]
    batched = factorize_batch(weights, importances, ranks, solver=solver, max_iters=15, tol=0.0)
    for weight, importance, result in zip(weights, importances, batched, strict=True):
        single = factorize(weight, importance, 3, solver=solver, max_iters=15, tol=0.0)
        assert result.iterations == single.iterations
        assert result.loss == pytest.approx(single.loss, rel=1e-8)


def test_stopping_rules_cap_iterations_and_time():
    weight, importance = _problem(seed=14)
    capped = factorize(weight, importance, 4, solver="adam", max_iters=7, tol=0.0)
    assert capped.iterations == 7 and len(capped.history) == 8
    assert capped.stop_reason == "max_iters"
    timed = factorize(
        weight, importance, 4, solver="adam", max_iters=10**6, tol=0.0, max_seconds=0.2
    )
    assert timed.iterations < 10**6 and timed.history[-1][0] < 5.0
    assert timed.stop_reason == "max_seconds"
    tolerant = factorize(weight, importance, 4, solver="als", max_iters=10**6, tol=1e-3)
    assert tolerant.iterations < 10**6 and tolerant.stop_reason == "converged"


@pytest.mark.parametrize("solver", ["svd", "fwsvd"])
def test_closed_forms_stop_as_exact(solver):
    weight, importance = _problem()
    results = factorize_batch(
        [weight, weight.T.contiguous()], [importance, None], [4, 4], solver=solver
    )
    assert [result.stop_reason for result in results] == ["exact", "exact"]
    assert [result.iterations for result in results] == [0, 0]


@pytest.mark.parametrize("solver", ITERATIVE)
@pytest.mark.parametrize("max_iters", [0, 2])
def test_hitting_max_iters_stops_as_max_iters(solver, max_iters):
    weight, importance = _problem(seed=15)
    result = factorize(weight, importance, 4, solver=solver, max_iters=max_iters, tol=0.0)
    assert result.stop_reason == "max_iters"
    assert result.iterations == max_iters and len(result.history) == max_iters + 1


@pytest.mark.parametrize("solver", ITERATIVE)
def test_a_large_tol_stops_as_converged_before_max_iters(solver):
    weight, importance = _problem(seed=16)
    result = factorize(weight, importance, 4, solver=solver, max_iters=500, tol=0.5)
    assert result.stop_reason == "converged"
    # The relative improvement is measured over the solver's window, so it needs window + 1 steps.
    assert STOPPING_WINDOWS[solver] < result.iterations < 500
    assert len(result.history) == result.iterations + 1


@pytest.mark.parametrize("solver", ITERATIVE)
def test_a_tiny_time_budget_stops_as_max_seconds(solver):
    weight, importance = _problem(seed=17)
    result = factorize(
        weight, importance, 4, solver=solver, max_iters=10**6, tol=0.0, max_seconds=1e-9
    )
    assert result.stop_reason == "max_seconds"
    assert result.iterations == 0 and result.loss == result.initial_loss


@pytest.mark.parametrize(("solver", "tol"), [("als", 1e-3), ("tfwsvd", 1e-3), ("adam", 1e-3)])
def test_layers_of_one_batch_stop_for_their_own_reason(solver, tol):
    problems = [_problem(20, 12, seed) for seed in (18, 19, 20, 21)]
    weights = [weight for weight, _ in problems]
    importances = [importance for _, importance in problems]
    options = (
        {"solver": solver, "tol": tol, "lr": 1e-2}
        if solver == "adam"
        else {"solver": solver, "tol": tol}
    )
    free = factorize_batch(weights, importances, [3] * 4, max_iters=2000, **options)
    counts = [result.iterations for result in free]
    assert all(result.stop_reason == "converged" for result in free)
    assert min(counts) < max(counts)
    cap = min(counts)
    capped = factorize_batch(weights, importances, [3] * 4, max_iters=cap, **options)
    for alone, result in zip(free, capped, strict=True):
        if alone.iterations <= cap:
            # A layer that converged before the cap is unaffected by it, bit for bit.
            assert result.stop_reason == "converged" and result.iterations == alone.iterations
            assert torch.equal(result.left, alone.left) and torch.equal(result.right, alone.right)
        else:
            assert result.stop_reason == "max_iters" and result.iterations == cap


def _random_state(cls: type[Batched], batch: int, generator: torch.Generator) -> Batched:
    """A ``cls`` whose every tensor field holds distinct random per-layer values."""
    values = {}
    for name, kind in typing.get_type_hints(cls).items():
        if kind is torch.Tensor:
            dims = int(torch.randint(0, 3, (), generator=generator))
            trailing = [int(size) for size in torch.randint(1, 4, (dims,), generator=generator)]
            values[name] = torch.randn(batch, *trailing, generator=generator)
        elif isinstance(kind, type) and issubclass(kind, Batched):
            values[name] = _random_state(kind, batch, generator)
        else:
            values[name] = 7
    return cls(**values)


def _tensor_fields(state: Batched, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in ``state``, nested ones included, by dotted field name."""
    found = {}
    for item in dataclasses.fields(state):
        value = getattr(state, item.name)
        if isinstance(value, torch.Tensor):
            found[prefix + item.name] = value
        elif isinstance(value, Batched):
            found.update(_tensor_fields(value, f"{prefix}{item.name}."))
    return found


@pytest.mark.parametrize("cls", [AdamState, SgdState, SwatsState, AlsState, EmState, TfwsvdState])
@pytest.mark.parametrize(
    "layers", [torch.tensor([3, 0]), torch.tensor([False, True, True, False, True])]
)
def test_select_keeps_exactly_the_selected_layers(cls, layers):
    generator = torch.Generator().manual_seed(22)
    state = _random_state(cls, 5, generator)
    if cls is SwatsState:
        # Per-layer scalars, as the solver keeps them; layers 1 and 4 never switched.
        state = dataclasses.replace(
            state,
            sgd_mode=torch.tensor([True, False, True, True, False]),
            switch_iteration=torch.tensor([20, 0, 31, 42, 0]),
            swats_lr=torch.rand(5, generator=generator, dtype=torch.float64),
            sgd_lr=torch.rand(5, generator=generator, dtype=torch.float64),
            lambda_max=torch.rand(5, generator=generator, dtype=torch.float64),
        )
    indices = layers.nonzero().flatten() if layers.dtype == torch.bool else layers
    selected = state.select(layers)
    assert type(selected) is cls and isinstance(selected, IterateState)
    assert selected.iteration == state.iteration == 7
    before, after = _tensor_fields(state), _tensor_fields(selected)
    assert before.keys() == after.keys() and {"weight", "importance", "left", "right"} <= set(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor[indices]), name
    for position, layer in enumerate(indices.tolist()):
        assert selected.info(position) == state.info(layer)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, i: factorize(w, i, 3, solver="nope"), "unknown solver"),
        (lambda w, i: factorize(w, i, 3, solver="svd", learning_rate=1.0), "unknown option"),
        (lambda w, i: factorize(w, i, 3, solver="fwsvd", axis="rows"), "axis"),
        (lambda w, i: factorize(w[0], i, 3, solver="svd"), "2-D"),
        (lambda w, i: factorize(w, i[:, :3], 3, solver="svd"), "importance shape"),
        (lambda w, i: factorize(w, -i, 3, solver="fwsvd"), "negative"),
        (lambda w, i: factorize(w, i * float("nan"), 3, solver="fwsvd"), "NaN"),
        (lambda w, i: factorize(w, i, 0, solver="svd"), "rank"),
        (lambda w, i: factorize(w, i, 16, solver="svd"), "rank"),
        (lambda w, i: factorize_batch([w, w], [i], [3, 3], solver="svd"), "equal lengths"),
        (lambda w, i: factorize_batch([w, w[:, :4]], [i, i], [3, 3], solver="svd"), "layer 1"),
        (lambda w, i: factorize(w, i, 3, solver="als", axis="in"), "unknown option"),
        (lambda w, i: factorize(w, i, 3, solver="adam", init="zeros"), "init"),
        (lambda w, i: factorize(w, i, 3, solver="adam", max_iters=-1), "max_iters"),
        (lambda w, i: factorize(w, i, 3, solver="adam", tol=-1.0), "tol"),
        (lambda w, i: factorize(w, i, 3, solver="adam", max_seconds=0), "max_seconds"),
        (lambda w, i: factorize(w, i, 3, solver="als", damping=0.0), "damping"),
        (lambda w, i: factorize(w, i, 3, solver="sgd", lr=-1.0), "lr"),
        (lambda w, i: factorize(w, i, 3, solver="tfwsvd", restart=0), "restart"),
        (lambda w, i: factorize(w, i, 3, solver="tfwsvd", seed="a"), "seed"),
        (lambda w, i: factorize(w, i, 3, solver="tfwsvd", device="tpu"), "device"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    weight, importance = _problem()
    with pytest.raises(ValueError, match=message):
        call(weight, importance)


@pytest.mark.parametrize(
    ("solver", "options", "message"),
    [
        ("als", {"damping": -1.0}, r"'als': damping must be a number > 0"),
        ("sgd", {"lr": 0}, r"'sgd': lr must be a number > 0"),
        ("adam", {"lr": "auto"}, r"'adam': lr must be a number > 0, got 'auto'"),
        ("tfwsvd", {"restart": 0}, r"'tfwsvd': restart must be an int >= 1"),
        ("adam_sgd", {"beta2": 1.0}, r"'adam_sgd': beta2 must be a number in \[0, 1\)"),
    ],
)
def test_every_option_is_checked_before_any_solve(solver, options, message):
    """Bad option values fail in the registry, before a Fisher or a model is touched."""
    with pytest.raises(ValueError, match=message):
        check_solver_options(solver, options)


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (12, 12)])
def test_balanced_truncated_svd_is_the_best_rank_r_approximation_of_tall_and_wide_matrices(shape):
    # Wide matrices are factored through their transpose (faster LAPACK path): same product, same
    # balance (‖A‖ = ‖B‖ column/row-wise, both √S), as Eckart–Young's truncation.
    generator = torch.Generator().manual_seed(15)
    matrix = torch.randn(2, *shape, generator=generator, dtype=torch.float64)
    left, right = balanced_truncated_svd(matrix, 4)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    best = u[:, :, :4] @ torch.diag_embed(s[:, :4]) @ vh[:, :4, :]
    torch.testing.assert_close(left @ right, best)
    assert left.shape == (2, shape[0], 4) and right.shape == (2, 4, shape[1])
    torch.testing.assert_close(left.norm(dim=1), right.norm(dim=2))
    torch.testing.assert_close(left.norm(dim=1).square(), s[:, :4])
