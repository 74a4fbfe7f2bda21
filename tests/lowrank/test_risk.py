"""Risk statistics: φ(W) definition, invariances, shares, per-layer table and summary."""

from __future__ import annotations

import math

import pytest
import torch

from weighted_lowrank.lowrank.risk import (
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
    with pytest.raises(ValueError, match=r"'entropy' is unknown; expected one of \['phi'"):
        check_risk_statistic("entropy")
    with pytest.raises(ValueError, match="needs compare_solvers"):
        layer_statistics(weights, fisher, statistic="svd_loss_rel_fwsvd", compare_solvers=False)
    with pytest.raises(ValueError, match="number of examples"):
        layer_statistics(weights, fisher, statistic="svd_taylor_loss", num_examples=None)
    assert set(SOLVER_STATISTICS) < set(RISK_STATISTICS)
