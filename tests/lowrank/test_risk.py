"""Risk statistics: φ(W) definition, invariances, shares, the Kronecker-predicted SVD damage,
per-layer table and summary."""

from __future__ import annotations

import math

import pytest
import torch

from weighted_lowrank.lowrank import risk
from weighted_lowrank.lowrank.loss_models import LayerCurvature, predicted_loss_increase
from weighted_lowrank.lowrank.risk import (
    KRONECKER_STATISTICS,
    RISK_STATISTICS,
    SOLVER_STATISTICS,
    check_risk_statistic,
    fisher_variance,
    layer_statistics,
    max_to_mean,
    risk_level,
    risk_summary,
    top_share,
)


def test_phi_matches_definition_on_a_known_matrix():
    # I / mean(I) = [0.5, 1.5, 0.5, 1.5] → population variance 0.25.
    assert fisher_variance(torch.tensor([[1.0, 3.0], [1.0, 3.0]])) == pytest.approx(0.25, abs=1e-12)
    importance = torch.rand(17, 9, generator=torch.Generator().manual_seed(0)).double()
    normalised = importance / importance.mean()
    assert fisher_variance(importance) == pytest.approx(
        float(normalised.var(unbiased=False)), rel=1e-12
    )


@pytest.mark.parametrize("scale", [1e-12, 0.5, 3.0, 1e9])
def test_phi_is_scale_invariant(scale):
    importance = torch.rand(32, 48, generator=torch.Generator().manual_seed(1)) ** 4
    assert fisher_variance(importance * scale) == pytest.approx(
        fisher_variance(importance), rel=1e-6
    )


def test_phi_is_zero_for_uniform_and_grows_with_concentration():
    assert fisher_variance(torch.full((8, 5), 7.0)) == 0.0
    spike = torch.ones(10, 10)
    spike[0, 0] = 100.0
    assert fisher_variance(spike) > fisher_variance(torch.ones(10, 10) + torch.rand(10, 10))


def test_shares_and_ratios():
    importance = torch.ones(10, 10)
    importance[3, 4] = 101.0  # total 200
    assert top_share(importance, 0.01) == pytest.approx(101 / 200)
    assert top_share(torch.ones(4, 50), 0.01) == pytest.approx(2 / 200)
    assert max_to_mean(importance) == pytest.approx(101 / 2)
    assert max_to_mean(torch.full((3, 3), 2.0)) == pytest.approx(1.0)
    assert risk_level(5.0, 4.0) == "high" and risk_level(3.9, 4.0) == "low"


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([[1.0, -1.0]]), "negative"),
        (torch.zeros(3, 3), "all zero"),
        (torch.tensor([[1.0, math.nan]]), "NaN"),
        (torch.zeros(0, 3), "empty"),
    ],
)
def test_invalid_importance_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        fisher_variance(bad)


def test_layer_statistics_uniform_vs_separable_importance():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 40, generator=generator)
    uniform = torch.ones(24, 40)
    # Separable (row × column) importance: two-sided FWSVD is the exact weighted optimum.
    separable = (
        torch.rand(24, 1, generator=generator) ** 3 @ torch.rand(1, 40, generator=generator) ** 3
        + 1e-3
    )
    weights = {
        "enc.layer.0.attention.self.query.weight": weight,
        "enc.layer.1.output.dense.weight": weight,
    }
    fisher = {
        "enc.layer.0.attention.self.query.weight": uniform,
        "enc.layer.1.output.dense.weight": separable,
    }
    rows = layer_statistics(weights, fisher, budget=0.5, threshold=1.0)
    flat, peaked = rows
    assert (flat["layer"], flat["kind"], flat["rank"]) == (0, "query", 24 * 40 // 64 // 2)
    assert (peaked["layer"], peaked["kind"]) == (1, "ffn_out")
    assert flat["phi"] == 0.0 and flat["risk"] == "low"
    assert flat["svd_loss_rel_fwsvd"] == pytest.approx(1.0, rel=1e-4)
    assert flat["svd_error_alignment"] == pytest.approx(1.0, rel=1e-9)
    assert peaked["phi"] > 1.0 and peaked["risk"] == "high"
    assert peaked["svd_loss_rel_fwsvd"] > 1.05
    assert peaked["top_share"] > flat["top_share"] == pytest.approx(10 / 960)

    summary = risk_summary(rows, threshold=1.0)
    assert summary["layers"] == 2 and summary["high_risk_layers"] == 1
    assert summary["high_risk_modules"] == ["enc.layer.1.output.dense"]
    assert summary["phi_max_module"] == "enc.layer.1.output.dense"
    assert summary["phi_mean"] == pytest.approx(peaked["phi"] / 2)
    assert summary["svd_loss_rel_fwsvd_max"] == pytest.approx(peaked["svd_loss_rel_fwsvd"])


def test_layer_statistics_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match weight shape"):
        layer_statistics({"a.weight": torch.ones(3, 4)}, {"a.weight": torch.ones(4, 3)})
    with pytest.raises(ValueError, match="weights lack"):
        layer_statistics({}, {"a.weight": torch.ones(4, 3)})


def test_taylor_columns_are_half_the_weighted_svd_and_fwsvd_losses_per_example():
    generator = torch.Generator().manual_seed(4)
    key = "enc.layer.0.intermediate.dense.weight"
    weight = torch.randn(20, 36, generator=generator, dtype=torch.float64)
    importance = torch.rand(20, 36, generator=generator, dtype=torch.float64) ** 3 + 1e-3
    (row,) = layer_statistics({key: weight}, {key: importance}, budget=0.5, num_examples=8)
    rank = row["rank"]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    residual = weight - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    svd_loss = float((importance * residual**2).sum())
    assert row["svd_taylor_loss"] == pytest.approx(0.5 * svd_loss / 8, rel=1e-6)
    fwsvd_loss = svd_loss / row["svd_loss_rel_fwsvd"]
    assert row["fwsvd_taylor_gain"] == pytest.approx(0.5 * (svd_loss - fwsvd_loss) / 8, rel=1e-6)
    # Unknown N: no Taylor columns (the others stay).
    (unknown,) = layer_statistics({key: weight}, {key: importance}, budget=0.5)
    assert "svd_taylor_loss" not in unknown and "svd_loss_rel_fwsvd" in unknown


def test_risk_column_follows_the_selected_statistic():
    generator = torch.Generator().manual_seed(5)
    keys = [f"enc.layer.{i}.attention.self.key.weight" for i in range(3)]
    weights = {
        key: torch.randn(16, 16, generator=generator) * (i + 1) for i, key in enumerate(keys)
    }
    fisher = {key: torch.rand(16, 16, generator=generator) + 0.1 for key in keys}
    rows = layer_statistics(
        weights, fisher, statistic="svd_taylor_loss", threshold=0.0, num_examples=2
    )
    assert all(row["risk"] == "high" for row in rows)
    middle = sorted(row["svd_taylor_loss"] for row in rows)[1]
    rows = layer_statistics(
        weights, fisher, statistic="svd_taylor_loss", threshold=middle, num_examples=2
    )
    assert [row["risk"] for row in rows] == [
        "high" if row["svd_taylor_loss"] >= middle else "low" for row in rows
    ]
    assert sum(row["risk"] == "high" for row in rows) == 2
    summary = risk_summary(rows, statistic="svd_taylor_loss", threshold=middle)
    assert summary["risk_statistic"] == "svd_taylor_loss" and summary["high_risk_layers"] == 2


def test_unknown_or_uncomputable_risk_statistic_is_rejected():
    weights = {"a.weight": torch.ones(4, 6)}
    fisher = {"a.weight": torch.rand(4, 6) + 0.1}
    with pytest.raises(
        ValueError, match=r"'entropy' is unknown; expected one of \['svd_kronecker_loss', 'phi'"
    ):
        check_risk_statistic("entropy")
    with pytest.raises(ValueError, match="needs compare_solvers"):
        layer_statistics(weights, fisher, statistic="svd_loss_rel_fwsvd", compare_solvers=False)
    with pytest.raises(ValueError, match="number of examples"):
        layer_statistics(weights, fisher, statistic="svd_taylor_loss", num_examples=None)
    assert set(SOLVER_STATISTICS) < set(RISK_STATISTICS)
    assert set(KRONECKER_STATISTICS) < set(RISK_STATISTICS)
    assert not set(KRONECKER_STATISTICS) & set(SOLVER_STATISTICS)  # no compare_solvers needed


def _moment(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random symmetric positive definite second moment, as calibration_statistics stores it."""
    factor = torch.randn(size, 2 * size, generator=generator)
    return factor @ factor.T / (2 * size)


def _kronecker_problem(seed: int = 6):
    """Three layers of different shapes with their Fisher and calibration statistics A, G."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "enc.layer.0.attention.self.value": (12, 12),
        "enc.layer.0.intermediate.dense": (30, 12),
        "enc.layer.1.output.dense": (12, 30),
    }
    weights, fisher, calibration = {}, {}, {}
    for module, (out_features, in_features) in shapes.items():
        weights[f"{module}.weight"] = torch.randn(out_features, in_features, generator=generator)
        fisher[f"{module}.weight"] = torch.rand(out_features, in_features, generator=generator)
        calibration[f"{module}.input_moment"] = _moment(in_features, generator)
        calibration[f"{module}.output_moment"] = _moment(out_features, generator)
        calibration[f"{module}.input_abs_mean"] = torch.rand(in_features, generator=generator)
    return weights, fisher, calibration


def _truncated_svd_residual(weight: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return weight.double() - u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("compare_solvers", [True, False])
def test_kronecker_column_is_the_loss_models_prediction_for_the_svd_residual(compare_solvers):
    weights, fisher, calibration = _kronecker_problem()
    rows = layer_statistics(
        weights, fisher, budget=0.4, calibration=calibration, compare_solvers=compare_solvers
    )
    assert len(rows) == 3
    for row in rows:
        weight = weights[f"{row['module']}.weight"]
        assert row["rank"] == int(0.4 * weight.numel() / sum(weight.shape))
        residual = _truncated_svd_residual(weight, row["rank"])
        curvature = LayerCurvature(
            input_moment=calibration[f"{row['module']}.input_moment"],
            output_moment=calibration[f"{row['module']}.output_moment"],
        )
        expected = predicted_loss_increase(residual, curvature)["kronecker"]
        assert row["svd_kronecker_loss"] == pytest.approx(expected, rel=1e-5)
        # The same quadratic from the explicit Kronecker curvature G ⊗ A (vec row-major).
        explicit = torch.kron(curvature.output_moment.double(), curvature.input_moment.double())
        vec = residual.flatten()
        assert row["svd_kronecker_loss"] == pytest.approx(
            float(0.5 * vec @ explicit @ vec), rel=1e-5
        )
        assert row["svd_kronecker_loss"] > 0
        assert ("svd_loss_rel_fwsvd" in row) is compare_solvers


@pytest.mark.parametrize("input_scale, output_scale", [(1.0, 1.0), (3.0, 3.0), (0.02, 50.0)])
def test_kronecker_column_with_isotropic_moments_is_half_the_svd_tail_energy(
    input_scale, output_scale
):
    """A = a·I, G = g·I: ½ tr(Rᵀ g R a) = ½ a g ‖W − SVD_r W‖² = ½ a g Σ_{i>r} σ_i² (Eckart–Young)."""
    generator = torch.Generator().manual_seed(7)
    key, module = "enc.layer.0.attention.self.query.weight", "enc.layer.0.attention.self.query"
    weight = torch.randn(16, 24, generator=generator, dtype=torch.float64)
    calibration = {
        f"{module}.input_moment": input_scale * torch.eye(24, dtype=torch.float64),
        f"{module}.output_moment": output_scale * torch.eye(16, dtype=torch.float64),
    }
    (row,) = layer_statistics(
        {key: weight}, {key: torch.ones(16, 24)}, budget=0.5, calibration=calibration
    )
    singular = torch.linalg.svdvals(weight)
    tail = float(singular[row["rank"] :].square().sum())
    assert row["rank"] == 4
    assert row["svd_kronecker_loss"] == pytest.approx(
        0.5 * input_scale * output_scale * tail, rel=1e-5
    )
    assert row["svd_kronecker_loss"] == pytest.approx(
        0.5 * input_scale * output_scale * float(_truncated_svd_residual(weight, 4).square().sum()),
        rel=1e-5,
    )


def test_kronecker_risk_column_and_summary():
    weights, fisher, calibration = _kronecker_problem(seed=8)
    rows = layer_statistics(weights, fisher, calibration=calibration, threshold=0.0)
    losses = sorted(row["svd_kronecker_loss"] for row in rows)
    rows = layer_statistics(
        weights,
        fisher,
        statistic="svd_kronecker_loss",
        threshold=losses[1],
        calibration=calibration,
    )
    assert [row["risk"] for row in rows] == [
        "high" if row["svd_kronecker_loss"] >= losses[1] else "low" for row in rows
    ]
    assert sum(row["risk"] == "high" for row in rows) == 2
    summary = risk_summary(rows, statistic="svd_kronecker_loss", threshold=losses[1])
    assert summary["risk_statistic"] == "svd_kronecker_loss" and summary["high_risk_layers"] == 2
    assert summary["svd_kronecker_loss_sum"] == pytest.approx(sum(losses))
    assert summary["svd_kronecker_loss_max"] == losses[-1]
    riskiest = max(rows, key=lambda row: row["svd_kronecker_loss"])["module"]
    assert summary["svd_kronecker_loss_max_module"] == riskiest
    # Without the column the summary has no Kronecker keys.
    plain = risk_summary(layer_statistics(weights, fisher))
    assert not any(key.startswith("svd_kronecker") for key in plain)


def test_kronecker_column_is_absent_without_a_and_g_and_selecting_it_names_what_is_missing(
    monkeypatch,
):
    weights, fisher, calibration = _kronecker_problem(seed=9)
    lacking_g = {
        key: value
        for key, value in calibration.items()
        if key != "enc.layer.0.intermediate.dense.output_moment"
    }
    only_abs = {key: value for key, value in calibration.items() if "input_abs_mean" in key}
    for partial in (None, {}, lacking_g, only_abs):
        rows = layer_statistics(weights, fisher, calibration=partial)
        assert all("svd_kronecker_loss" not in row for row in rows)
        assert all("phi" in row and "svd_loss_rel_fwsvd" in row for row in rows)

    # Selected, the missing statistics are named before any factorization starts.
    def no_work(*args, **kwargs):
        raise AssertionError("factorized before the missing statistics were reported")

    monkeypatch.setattr(risk, "factorize_batch", no_work)
    with pytest.raises(
        ValueError,
        match=r"'svd_kronecker_loss' needs the calibration statistics input_moment \(A\) and "
        r"output_moment \(G\) of every layer; calibration_statistics lacks "
        r"\['enc\.layer\.0\.intermediate\.dense\.output_moment'\];.*fisher_estimation",
    ):
        layer_statistics(weights, fisher, statistic="svd_kronecker_loss", calibration=lacking_g)
    with pytest.raises(
        ValueError,
        match=r"lacks \['enc\.layer\.0\.attention\.self\.value\.input_moment', "
        r"'enc\.layer\.0\.attention\.self\.value\.output_moment', .*\] and 2 more",
    ):
        layer_statistics(weights, fisher, statistic="svd_kronecker_loss", calibration=only_abs)
    with pytest.raises(ValueError, match="choose another statistic of \\['phi'"):
        check_risk_statistic("svd_kronecker_loss", missing_calibration=["a.input_moment"])
    assert check_risk_statistic("svd_kronecker_loss", compare_solvers=False) == "svd_kronecker_loss"


def test_kronecker_statistics_of_the_wrong_shape_are_rejected_naming_the_key():
    weights, fisher, calibration = _kronecker_problem(seed=10)
    calibration["enc.layer.1.output.dense.input_moment"] = torch.eye(12)
    with pytest.raises(
        ValueError,
        match=r"'enc\.layer\.1\.output\.dense\.input_moment' has shape \(12, 12\); the weight "
        r"of shape \(12, 30\) needs \(30, 30\)",
    ):
        layer_statistics(weights, fisher, calibration=calibration)
