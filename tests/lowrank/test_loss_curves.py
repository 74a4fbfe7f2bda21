"""Loss-vs-rank curves: each closed form's curve is its own objective at that rank, trace-scaled.

For every layer the curve at rank r is ``½ · (ΣI / N) / (tr_out · tr_in) · ‖S_out ΔW S_in‖²`` with
ΔW the residual of the solver's own rank-r factorization (``factorize_batch``): recomputed here
from the factors with the statistics as given, not from the module's spectrum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_bundle, random_fisher
from weighted_lowrank.lowrank.allocation import LossCurve, max_rank
from weighted_lowrank.lowrank.compression import model_loss_curves
from weighted_lowrank.lowrank.solvers import (
    SOLVERS,
    curve_needs,
    factorize_batch,
    rank_loss_curves,
    solver_spec,
)
from weighted_lowrank.lowrank.targets import select_linear_modules

#: Three tall layers of one shape (a batch) and two wide ones.
SHAPES = [(12, 7), (12, 7), (12, 7), (7, 12), (7, 12)]
CLOSED_FORMS = ("svd", "fwsvd", "kfwsvd", "svd_llm", "asvd")
ELEMENT_WISE = tuple(solver for solver in SOLVERS if solver not in CLOSED_FORMS)
#: Ranks checked against the factorizations (6 = the last below full rank, which factorize
#: refuses; the curve's full-rank 0 is checked in test_curves_decrease_with_rank_...).
RANKS = (1, 3, 6)
#: Relative tolerance of curve vs recomputed objective: fwsvd's positive floor on the row/column
#: sums, the 1e-6 relative damping of the moments.
TOLERANCE = {"svd": 1e-10, "fwsvd": 1e-6, "kfwsvd": 1e-4, "svd_llm": 1e-4, "asvd": 1e-10}
NUM_EXAMPLES = 5


def make_layers(seed: int = 0):
    """Random float64 weights, positive importances and each layer's calibration statistics."""
    generator = torch.Generator().manual_seed(seed)
    weights, importances, statistics = [], [], []
    for out_features, in_features in SHAPES:
        samples = 3 * max(out_features, in_features)
        weights.append(
            torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
        )
        importances.append(
            torch.rand(out_features, in_features, generator=generator, dtype=torch.float64) + 0.05
        )
        # Correlated inputs with uneven channel scales: A is far from the identity, |x| uneven.
        scales = torch.rand(in_features, generator=generator, dtype=torch.float64) * 3 + 0.2
        # Mixings near the identity keep A and G well conditioned: with condition number κ the
        # solver's 1e-6 relative damping moves its loss by ~1e-6·κ (the damped test is exact).
        mixing = (
            torch.eye(in_features, dtype=torch.float64)
            + 0.3
            * torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
            / in_features**0.5
        )
        inputs = torch.randn(samples, in_features, generator=generator, dtype=torch.float64)
        inputs = (inputs @ mixing) * scales
        outputs = torch.randn(samples, out_features, generator=generator, dtype=torch.float64)
        outputs = outputs @ (
            torch.eye(out_features, dtype=torch.float64)
            + 0.3
            * torch.randn(out_features, out_features, generator=generator, dtype=torch.float64)
            / out_features**0.5
        )
        statistics.append(
            {
                "input_moment": inputs.T @ inputs / samples,
                "output_moment": outputs.T @ outputs,
                "input_abs_mean": inputs.abs().mean(dim=0),
            }
        )
    return weights, importances, statistics


def scaled_objective(
    solver: str,
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    statistics: dict[str, torch.Tensor],
    delta: torch.Tensor,
    num_examples: int = 1,
    **options,
) -> float:
    """The solver's own quadratic in ``delta`` = W − left·right, scaled to the Fisher's trace."""
    out_features, in_features = weight.shape
    importance = torch.ones_like(weight) if importance is None else importance
    if solver == "svd":
        value = delta.square().sum()
        traces = out_features * in_features
    elif solver == "fwsvd":
        axis = options.get("axis", "both")
        rows = importance.sum(dim=1) if axis in ("out", "both") else torch.ones(out_features)
        columns = importance.sum(dim=0) if axis in ("in", "both") else torch.ones(in_features)
        value = (rows[:, None] * delta.square() * columns[None, :]).sum()
        traces = rows.sum() * columns.sum()
    elif solver == "kfwsvd":
        moment_in, moment_out = statistics["input_moment"], statistics["output_moment"]
        value = torch.trace(delta.T @ moment_out @ delta @ moment_in)
        traces = torch.trace(moment_out) * torch.trace(moment_in)
    elif solver == "svd_llm":
        moment_in = statistics["input_moment"]
        value = torch.trace(delta @ moment_in @ delta.T)
        traces = out_features * torch.trace(moment_in)
    elif solver == "asvd":
        scale = statistics["input_abs_mean"].pow(options.get("alpha", 0.5))
        scale = scale + 1e-6 * scale.mean()
        value = (delta * scale[None, :]).square().sum()
        traces = out_features * scale.square().sum()
    else:
        raise AssertionError(f"no closed form for {solver}")
    return float(0.5 * importance.sum() / num_examples * value / traces)


def recomputed(solver, weights, importances, statistics, rank, num_examples=1, **options):
    """Each layer's ``scaled_objective`` of ``solver``'s own rank-``rank`` factorization."""
    results = factorize_batch(
        weights, importances, [rank] * len(weights), solver, statistics=statistics, **options
    )
    return [
        scaled_objective(
            solver,
            weight,
            importance,
            layer,
            weight - result.left @ result.right,
            num_examples,
            **options,
        )
        for weight, importance, layer, result in zip(
            weights, importances, statistics, results, strict=True
        )
    ]


@pytest.mark.parametrize(
    ("solver", "options"),
    [
        ("svd", {}),
        ("fwsvd", {}),
        ("fwsvd", {"axis": "in"}),
        ("fwsvd", {"axis": "out"}),
        ("kfwsvd", {}),
        ("svd_llm", {}),
        ("asvd", {}),
        ("asvd", {"alpha": 1.0}),
    ],
)
def test_closed_form_curve_is_its_own_objective_at_every_checked_rank(solver, options):
    weights, importances, statistics = make_layers()
    curves = rank_loss_curves(
        weights,
        importances,
        solver,
        num_examples=NUM_EXAMPLES,
        statistics=statistics,
        **options,
    )
    assert [tuple(curve.shape) for curve in curves] == [(min(shape),) for shape in SHAPES]
    assert all(curve.dtype == torch.float64 for curve in curves)
    for rank in RANKS:
        expected = recomputed(
            solver, weights, importances, statistics, rank, NUM_EXAMPLES, **options
        )
        largest = max(float(curve[0]) for curve in curves)
        for index, (curve, value) in enumerate(zip(curves, expected, strict=True)):
            assert float(curve[rank - 1]) == pytest.approx(
                value, rel=TOLERANCE[solver], abs=1e-12 * largest
            ), (solver, options, rank, index)


@pytest.mark.parametrize("damping", [1e-3, 1e-2])
@pytest.mark.parametrize("solver", ["kfwsvd", "svd_llm"])
def test_damped_curve_is_the_damped_objective_exactly(solver, damping):
    """The spectrum is that of the damped moments (the solver's own); the traces the undamped."""
    weights, importances, statistics = make_layers(seed=1)
    damped = []
    for layer in statistics:
        moments = dict(layer)
        for name in ("input_moment", "output_moment"):
            moment = layer[name]
            size = moment.shape[0]
            moments[name] = moment + damping * torch.trace(moment) / size * torch.eye(
                size, dtype=moment.dtype
            )
        damped.append(moments)
    curves = rank_loss_curves(weights, importances, solver, statistics=statistics, damping=damping)
    for rank in (1, 4, 6):
        results = factorize_batch(
            weights,
            importances,
            [rank] * len(weights),
            solver,
            statistics=statistics,
            damping=damping,
        )
        for index, result in enumerate(results):
            delta = weights[index] - result.left @ result.right
            value = scaled_objective(
                solver, weights[index], importances[index], damped[index], delta
            )
            # Traces of the moments as given, not the damped ones.
            trace_ratio = {
                "kfwsvd": (1 + damping) ** 2,
                "svd_llm": 1 + damping,
            }[solver]
            assert float(curves[index][rank - 1]) == pytest.approx(value * trace_ratio, rel=1e-9), (
                solver,
                damping,
                rank,
                index,
            )


def test_element_wise_solvers_use_the_two_sided_fwsvd_curve_exactly():
    weights, importances, statistics = make_layers()
    reference = rank_loss_curves(weights, importances, "fwsvd", statistics=statistics)
    assert solver_spec("fwsvd").curve == "fwsvd"
    for solver in ELEMENT_WISE:
        assert solver_spec(solver).curve == "fwsvd (proxy)", solver
        curves = rank_loss_curves(weights, importances, solver, statistics=statistics)
        for curve, expected in zip(curves, reference, strict=True):
            assert torch.equal(curve, expected), solver
    # A one-sided fwsvd is not the proxy: the proxy ignores the axis it has no option for.
    one_sided = rank_loss_curves(weights, importances, "fwsvd", axis="in")
    assert not torch.equal(one_sided[0], reference[0])


@pytest.mark.parametrize("solver", SOLVERS)
def test_curves_decrease_with_rank_and_vanish_at_full_rank(solver):
    weights, importances, statistics = make_layers(seed=2)
    curves = rank_loss_curves(weights, importances, solver, statistics=statistics)
    for curve in curves:
        values = curve.numpy()
        assert np.all(np.isfinite(values)) and np.all(values >= 0), solver
        assert np.all(np.diff(values) <= 0), solver
        assert values[-1] == 0.0 and values[-2] > 0, solver
        assert values[0] > values[-2], solver


@pytest.mark.parametrize("solver", [*CLOSED_FORMS, "tfwsvd"])
def test_a_batch_gives_the_curves_of_its_layers_one_by_one(solver):
    weights, importances, statistics = make_layers(seed=3)
    batched = rank_loss_curves(weights, importances, solver, statistics=statistics)
    for index in range(len(weights)):
        (alone,) = rank_loss_curves(
            [weights[index]], [importances[index]], solver, statistics=[statistics[index]]
        )
        torch.testing.assert_close(batched[index], alone, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
def test_num_examples_divides_the_curve(solver):
    weights, importances, statistics = make_layers(seed=4)
    once = rank_loss_curves(weights, importances, solver, statistics=statistics)
    seven = rank_loss_curves(weights, importances, solver, num_examples=7, statistics=statistics)
    for single, many in zip(once, seven, strict=True):
        torch.testing.assert_close(many, single / 7, rtol=1e-14, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_no_importance_is_uniform_importance_one(solver):
    weights, _, statistics = make_layers(seed=5)
    ones = [torch.ones_like(weight) for weight in weights]
    uniform = rank_loss_curves(weights, [None] * len(weights), solver, statistics=statistics)
    explicit = rank_loss_curves(weights, ones, solver, statistics=statistics)
    for none, one in zip(uniform, explicit, strict=True):
        torch.testing.assert_close(none, one, rtol=1e-12, atol=0)


def test_uniform_importance_makes_fwsvd_the_plain_svd_curve():
    """Equal row and column sums: the weighted spectrum is the plain one, and so is the scale."""
    weights, _, _ = make_layers(seed=6)
    svd = rank_loss_curves(weights, [None] * len(weights), "svd")
    fwsvd = rank_loss_curves(weights, [None] * len(weights), "fwsvd")
    for plain, weighted in zip(svd, fwsvd, strict=True):
        torch.testing.assert_close(weighted, plain, rtol=1e-10, atol=1e-14)
    # And the plain SVD curve is the tail of W's squared singular values over out·in.
    for weight, curve in zip(weights, svd, strict=True):
        squares = torch.linalg.svdvals(weight).square()
        tails = torch.stack([squares[rank:].sum() for rank in range(1, len(squares) + 1)])
        torch.testing.assert_close(curve, 0.5 * tails, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("solver", SOLVERS)
def test_scaling_the_weight_by_c_scales_the_curve_by_c_squared(solver):
    weights, importances, statistics = make_layers(seed=7)
    base = rank_loss_curves(weights, importances, solver, statistics=statistics)
    scaled = rank_loss_curves(
        [3.0 * weight for weight in weights], importances, solver, statistics=statistics
    )
    for plain, times in zip(base, scaled, strict=True):
        torch.testing.assert_close(times, 9.0 * plain, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("solver", "statistic"),
    [
        ("kfwsvd", "input_moment"),
        ("kfwsvd", "output_moment"),
        ("svd_llm", "input_moment"),
        ("asvd", "input_abs_mean"),
    ],
)
def test_scaling_a_statistic_leaves_the_curve_unchanged(solver, statistic):
    """The traces match the curvature to the Fisher's: only the statistic's shape matters."""
    weights, importances, statistics = make_layers(seed=8)
    base = rank_loss_curves(weights, importances, solver, statistics=statistics)
    scaled_statistics = [{**layer, statistic: 250.0 * layer[statistic]} for layer in statistics]
    scaled = rank_loss_curves(weights, importances, solver, statistics=scaled_statistics)
    for plain, other in zip(base, scaled, strict=True):
        torch.testing.assert_close(other, plain, rtol=1e-10, atol=1e-14)


def test_scaling_the_importance_scales_the_curve():
    """The curve is in nats of the Fisher: twice the importance, twice the loss."""
    weights, importances, statistics = make_layers(seed=9)
    for solver in ("svd", "fwsvd", "kfwsvd"):
        base = rank_loss_curves(weights, importances, solver, statistics=statistics)
        doubled = rank_loss_curves(
            weights, [2.0 * imp for imp in importances], solver, statistics=statistics
        )
        for plain, twice in zip(base, doubled, strict=True):
            torch.testing.assert_close(twice, 2.0 * plain, rtol=1e-10, atol=1e-14)


def test_a_missing_statistic_is_an_error_naming_it_and_the_layer():
    weights, importances, statistics = make_layers()
    names = [f"block.{k}" for k in range(len(weights))]
    without_output = [
        {key: value for key, value in layer.items() if key != "output_moment"}
        for layer in statistics
    ]
    with pytest.raises(ValueError, match=r"'kfwsvd' needs output_moment for \['block\.0'"):
        rank_loss_curves(weights, importances, "kfwsvd", statistics=without_output, names=names)
    with pytest.raises(ValueError, match=r"'svd_llm' needs input_moment"):
        rank_loss_curves(weights, importances, "svd_llm")
    partial = [statistics[0], {}, *statistics[2:]]
    with pytest.raises(ValueError, match=r"'asvd' needs input_abs_mean for \['block\.1'\]"):
        rank_loss_curves(weights, importances, "asvd", statistics=partial, names=names)
    wrong = [{**layer, "input_moment": torch.eye(3)} for layer in statistics]
    with pytest.raises(ValueError, match=r"'block\.0'.*input_moment has shape \(3, 3\)"):
        rank_loss_curves(weights, importances, "svd_llm", statistics=wrong, names=names)


@pytest.mark.parametrize("num_examples", [0, -1, 1.0, True])
def test_num_examples_must_be_a_positive_int(num_examples):
    weights, importances, _ = make_layers()
    with pytest.raises(ValueError, match="num_examples must be an int >= 1"):
        rank_loss_curves(weights, importances, "svd", num_examples=num_examples)


def test_bad_inputs_are_errors_before_any_decomposition():
    weights, importances, _ = make_layers()
    with pytest.raises(ValueError, match="unknown solver"):
        rank_loss_curves(weights, importances, "nope")
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        rank_loss_curves(weights, importances[:-1], "svd")
    with pytest.raises(ValueError, match="non-empty"):
        rank_loss_curves([], [], "svd")
    with pytest.raises(ValueError, match="unknown option"):
        rank_loss_curves(weights, importances, "svd", damping=1e-3)
    negative = [importances[0], -importances[1], *importances[2:]]
    with pytest.raises(ValueError, match="layer 1"):
        rank_loss_curves(weights, negative, "svd")


def test_model_loss_curves_cover_every_targeted_module_up_to_its_max_rank():
    bundle = make_tiny_bundle()
    model = bundle.model
    fisher = random_fisher(model)
    targets = select_linear_modules(model)
    curves = model_loss_curves(model, fisher, "fwsvd", num_examples=3)
    assert list(curves) == list(targets)
    for name, curve in curves.items():
        out_features, in_features = targets[name].weight.shape
        assert isinstance(curve, LossCurve)
        assert (curve.out_features, curve.in_features) == (out_features, in_features)
        assert len(curve.losses) == max_rank(out_features, in_features) == curve.max_rank
        assert curve.max_rank < min(out_features, in_features)
        assert np.all(np.diff(curve.losses) <= 0) and curve.losses[-1] > 0, name
    # The same numbers as the layer-level function, cut at max_rank.
    (query,) = [name for name in targets if name.endswith("layer.0.attention.self.query")]
    module = targets[query]
    (full,) = rank_loss_curves(
        [module.weight.detach()], [fisher[f"{query}.weight"]], "fwsvd", num_examples=3
    )
    np.testing.assert_allclose(
        curves[query].losses, full[: curves[query].max_rank].numpy(), rtol=1e-6
    )
    # No Fisher: uniform importance; the plain SVD and FWSVD curves agree.
    plain = model_loss_curves(model, None, "svd")
    weighted = model_loss_curves(model, None, "fwsvd")
    for name in targets:
        np.testing.assert_allclose(weighted[name].losses, plain[name].losses, rtol=1e-5)


def test_model_loss_curves_name_the_module_missing_a_statistic():
    model = make_tiny_bundle().model
    fisher = random_fisher(model)
    targets = list(select_linear_modules(model))
    statistics = {
        f"{name}.input_moment": torch.eye(module.in_features)
        for name, module in select_linear_modules(model).items()
    }
    del statistics[f"{targets[2]}.input_moment"]
    with pytest.raises(ValueError, match=rf"needs input_moment for \['{targets[2]}'\]"):
        model_loss_curves(model, fisher, "svd_llm", statistics=statistics)
    with pytest.raises(ValueError, match="num_examples must be an int >= 1"):
        model_loss_curves(model, fisher, "svd", num_examples=0)


def kronecker_priced(weight, importance, layer, delta, num_examples):
    """½ (ΣI/N) tr(ΔWᵀ G ΔW A) / (tr G · tr A): the Kronecker model at the Fisher's trace."""
    moment_in, moment_out = layer["input_moment"], layer["output_moment"]
    value = ((moment_out @ delta) * (delta @ moment_in)).sum()
    traces = torch.trace(moment_out) * torch.trace(moment_in)
    return float(0.5 * importance.sum() / num_examples * value / traces)


@pytest.mark.parametrize("solver", [*CLOSED_FORMS, "tfwsvd"])
def test_kronecker_priced_curve_is_the_kronecker_loss_of_the_solvers_own_solutions(solver):
    weights, importances, statistics = make_layers()
    curves = rank_loss_curves(
        weights,
        importances,
        solver,
        num_examples=NUM_EXAMPLES,
        loss_model="kronecker",
        statistics=statistics,
    )
    # The element-wise solvers' path is the proxy's: two-sided FWSVD's solutions.
    path = "fwsvd" if solver == "tfwsvd" else solver
    for rank in RANKS:
        results = factorize_batch(
            weights, importances, [rank] * len(weights), path, statistics=statistics
        )
        for curve, weight, importance, layer, result in zip(
            curves, weights, importances, statistics, results, strict=True
        ):
            expected = kronecker_priced(
                weight, importance, layer, weight - result.left @ result.right, NUM_EXAMPLES
            )
            assert float(curve[rank - 1]) == pytest.approx(expected, rel=1e-9), (solver, rank)
    for curve in curves:
        assert float(curve[-1]) == 0.0 and bool((curve >= 0).all())


def test_kfwsvd_priced_by_kronecker_is_its_own_curve_up_to_the_damping():
    weights, importances, statistics = make_layers()
    own = rank_loss_curves(weights, importances, "kfwsvd", statistics=statistics)
    priced = rank_loss_curves(
        weights, importances, "kfwsvd", loss_model="kronecker", statistics=statistics
    )
    for mine, theirs in zip(own, priced, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-12)


def test_kronecker_pricing_needs_both_moments_for_every_solver():
    weights, importances, statistics = make_layers()
    assert curve_needs("svd", "kronecker") == ("input_moment", "output_moment")
    assert curve_needs("asvd", "kronecker") == ("input_moment", "output_moment", "input_abs_mean")
    assert curve_needs("svd") == ()
    only_inputs = [{"input_moment": layer["input_moment"]} for layer in statistics]
    with pytest.raises(ValueError, match=r"needs output_moment for \['layer 0'"):
        rank_loss_curves(
            weights, importances, "svd", loss_model="kronecker", statistics=only_inputs
        )
    with pytest.raises(ValueError, match=r"curve loss model 'diagonal' is unknown"):
        rank_loss_curves(weights, importances, "svd", loss_model="diagonal")
