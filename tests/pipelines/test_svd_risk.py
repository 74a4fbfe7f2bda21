"""svd_risk pipeline on a tiny random BERT, its Fisher and calibration statistics, run from an
in-memory catalog."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.pandas import ParquetDataset
from matplotlib.figure import Figure

from tests.conftest import block_values, make_tiny_bundle, typed_params, varied_split
from tests.pipelines.conftest import make_calibration_statistics
from weighted_lowrank.hf.batching import make_batches
from weighted_lowrank.kedro_glue.lineage import fingerprint_of
from weighted_lowrank.kedro_glue.parameters import ParameterError, SvdRiskParams
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.fisher import empirical_fisher
from weighted_lowrank.lowrank.loss_models import LayerCurvature, predicted_loss_increase
from weighted_lowrank.lowrank.risk import DEFAULT_KRONECKER_THRESHOLD, fisher_variance
from weighted_lowrank.pipelines.svd_risk import create_pipeline
from weighted_lowrank.pipelines.svd_risk.nodes import compute_layer_risk

PARAMS = {
    "statistic": "phi",
    "thresholds": {"phi": 2.0},
    "top_fraction": 0.01,
    "compare_solvers": True,
}
COMPRESSION = typed_params("compression", budget=0.5, device="cpu")


@pytest.fixture(scope="module")
def bundle_and_fisher():
    bundle = make_tiny_bundle(seed=5)
    batches = make_batches(varied_split(24, seed=4), bundle.tokenizer, batch_size=8, max_length=16)
    tensors = empirical_fisher(bundle.model, batches)
    metadata = {
        "mode": "per_example",
        "num_examples": "24",
        "model_fingerprint": model_fingerprint(bundle.model),
        "targets": "null",
    }
    return bundle, {"tensors": tensors, "metadata": metadata}


@pytest.fixture(scope="module")
def calibration(bundle_and_fisher):
    """Random positive definite A and G (and |x| means) for every targeted layer."""
    return make_calibration_statistics(bundle_and_fisher[0].model)


def run_pipeline(
    bundle, fisher_information, directory, params=PARAMS, calibration_statistics=None
) -> DataCatalog:
    """``params`` replaces the whole svd_risk block (typed here, as the hook does in a run);
    ``calibration_statistics`` defaults to random A and G for every layer of ``bundle``."""
    if calibration_statistics is None:
        calibration_statistics = make_calibration_statistics(bundle.model)
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(bundle, copy_mode="assign"),
            "fisher_information": MemoryDataset(fisher_information, copy_mode="assign"),
            "calibration_statistics": MemoryDataset(calibration_statistics, copy_mode="assign"),
            "params:svd_risk": MemoryDataset(SvdRiskParams.model_validate(params)),
            "params:compression": MemoryDataset(COMPRESSION),
            "params:device": MemoryDataset("cpu"),
            # Persisted as in conf/base (a MemoryDataset would be released once consumed).
            "layer_risk": ParquetDataset(filepath=str(directory / "layer_risk.parquet")),
            "risk_summary": MemoryDataset(),
            "risk_heatmap": MemoryDataset(copy_mode="assign"),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_pipeline_reports_phi_per_layer_summary_and_heatmap(bundle_and_fisher, tmp_path) -> None:
    bundle, fisher_information = bundle_and_fisher
    catalog = run_pipeline(bundle, fisher_information, tmp_path)
    table: pd.DataFrame = catalog.load("layer_risk")
    summary = catalog.load("risk_summary")
    figure = catalog.load("risk_heatmap")

    tensors = fisher_information["tensors"]
    assert len(table) == len(tensors) == 12
    for row in table.itertuples():
        assert row.phi == pytest.approx(fisher_variance(tensors[f"{row.module}.weight"]), rel=1e-12)
        assert row.risk == ("high" if row.phi >= PARAMS["thresholds"]["phi"] else "low")
        assert 0 < row.top_share <= 1 and row.max_to_mean >= 1
        assert row.rank == int(
            0.5 * row.out_features * row.in_features / (row.out_features + row.in_features)
        )
        assert row.svd_loss_rel_fwsvd > 0 and row.svd_error_alignment > 0
    assert sorted(set(table["kind"])) == sorted(
        ["query", "key", "value", "attention_output", "ffn_in", "ffn_out"]
    )
    assert set(table["layer"]) == {0, 1}
    assert set(table["model_fingerprint"]) == {model_fingerprint(bundle.model)}
    assert fingerprint_of(table) == fingerprint_of(summary) == model_fingerprint(bundle.model)

    assert summary["layers"] == 12
    assert summary["high_risk_layers"] == int((table["risk"] == "high").sum())
    assert summary["phi_max"] == pytest.approx(table["phi"].max())
    assert summary["phi_max_module"] == table.loc[table["phi"].idxmax(), "module"]
    json.dumps(summary, allow_nan=False)

    assert isinstance(figure, Figure)
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (2, 6)
    assert float(image.max()) == pytest.approx(table["phi"].max())
    figure.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000


def test_fisher_that_does_not_match_the_model_is_rejected(bundle_and_fisher, tmp_path) -> None:
    bundle, fisher_information = bundle_and_fisher
    tensors = dict(fisher_information["tensors"])
    missing = {
        **fisher_information,
        "tensors": {k: v for k, v in tensors.items() if "layer.1.attention.self.key" not in k},
    }
    with pytest.raises(Exception, match="lacks targeted weights"):
        run_pipeline(bundle, missing, tmp_path)
    other = make_tiny_bundle(seed=5, hidden=48)
    with pytest.raises(Exception, match="has shape"):
        run_pipeline(other, {**fisher_information, "metadata": {}}, tmp_path)


def test_taylor_statistic_can_drive_the_risk_column(bundle_and_fisher, tmp_path) -> None:
    bundle, fisher_information = bundle_and_fisher
    params = {**PARAMS, "statistic": "svd_taylor_loss", "thresholds": {"svd_taylor_loss": 0.0}}
    table = run_pipeline(bundle, fisher_information, tmp_path, params).load("layer_risk")
    # ½ Σ I R² / N with N = 24 examples (metadata), R = W − SVD_r(W).
    modules = dict(bundle.model.named_modules())
    for row in table.itertuples():
        weight = modules[row.module].weight.detach().double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        residual = weight - u[:, : row.rank] @ torch.diag(s[: row.rank]) @ vh[: row.rank]
        importance = fisher_information["tensors"][f"{row.module}.weight"].double()
        expected = 0.5 * float((importance * residual**2).sum()) / 24
        assert row.svd_taylor_loss == pytest.approx(expected, rel=1e-4)
    threshold = float(table["svd_taylor_loss"].median())
    params["thresholds"] = {"svd_taylor_loss": threshold}
    catalog = run_pipeline(bundle, fisher_information, tmp_path, params)
    table = catalog.load("layer_risk")
    assert (table["risk"] == "high").tolist() == (table["svd_taylor_loss"] >= threshold).tolist()
    summary = catalog.load("risk_summary")
    assert summary["risk_statistic"] == "svd_taylor_loss"
    assert summary["risk_threshold"] == threshold
    image = catalog.load("risk_heatmap").axes[0].images[0].get_array()
    assert float(image.max()) == pytest.approx(table["svd_taylor_loss"].max())


def test_the_table_carries_the_fine_tuned_models_fingerprint(bundle_and_fisher) -> None:
    """Lineage comes from the model the statistics were computed on, not from the Fisher's
    metadata (a mismatch of the two is the LineageCheck hook's to refuse, before the node)."""
    bundle, fisher_information = bundle_and_fisher
    stale = {**fisher_information, "metadata": {"num_examples": "24", "targets": "null"}}
    svd_risk = typed_params("svd_risk", **PARAMS)
    table = compute_layer_risk(
        bundle, stale, make_calibration_statistics(bundle.model), svd_risk, COMPRESSION, "cpu"
    )
    assert fingerprint_of(table) == model_fingerprint(bundle.model)
    assert table.columns[-1] == "model_fingerprint" and len(table) == 12


def test_a_taylor_statistic_needs_the_fishers_example_count(bundle_and_fisher) -> None:
    bundle, fisher_information = bundle_and_fisher
    unknown = {**fisher_information, "metadata": {"targets": "null"}}
    svd_risk = typed_params(
        "svd_risk", statistic="svd_taylor_loss", thresholds={"svd_taylor_loss": 0.0}
    )
    with pytest.raises(ValueError, match="needs the number of examples the Fisher sums over"):
        compute_layer_risk(bundle, unknown, {"tensors": {}}, svd_risk, COMPRESSION, "cpu")
    bad = {**fisher_information, "metadata": {"num_examples": "many"}}
    with pytest.raises(ValueError, match="'num_examples' is not an integer: 'many'"):
        compute_layer_risk(bundle, bad, {"tensors": {}}, svd_risk, COMPRESSION, "cpu")


def test_the_default_risk_signal_is_the_kronecker_predicted_svd_damage(
    bundle_and_fisher, calibration, tmp_path
) -> None:
    """conf/base's block: svd_kronecker_loss with its threshold, on every layer of the model."""
    bundle, fisher_information = bundle_and_fisher
    params = block_values("svd_risk")
    assert params["statistic"] == "svd_kronecker_loss"
    threshold = params["thresholds"]["svd_kronecker_loss"]
    assert threshold == DEFAULT_KRONECKER_THRESHOLD  # nats per example (docs/METHOD.md)
    catalog = run_pipeline(bundle, fisher_information, tmp_path, params, calibration)
    table = catalog.load("layer_risk")
    assert len(table) == 12
    modules = dict(bundle.model.named_modules())
    for row in table.itertuples():
        weight = modules[row.module].weight.detach().double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        residual = weight - u[:, : row.rank] @ torch.diag(s[: row.rank]) @ vh[: row.rank]
        curvature = LayerCurvature(
            input_moment=calibration["tensors"][f"{row.module}.input_moment"],
            output_moment=calibration["tensors"][f"{row.module}.output_moment"],
        )
        expected = predicted_loss_increase(residual, curvature)["kronecker"]
        assert row.svd_kronecker_loss == pytest.approx(expected, rel=1e-5)
        assert row.risk == ("high" if row.svd_kronecker_loss >= threshold else "low")
    summary = catalog.load("risk_summary")
    assert summary["risk_statistic"] == "svd_kronecker_loss"
    assert summary["risk_threshold"] == threshold
    assert summary["svd_kronecker_loss_sum"] == pytest.approx(table["svd_kronecker_loss"].sum())
    json.dumps(summary, allow_nan=False)
    figure = catalog.load("risk_heatmap")
    image = figure.axes[0].images[0].get_array()
    assert float(image.max()) == pytest.approx(table["svd_kronecker_loss"].max())
    assert "tr(ΔWᵀGΔWA)" in figure.axes[0].get_title()


def test_without_a_and_g_the_kronecker_column_is_absent_or_a_clear_error(
    bundle_and_fisher, calibration, tmp_path
) -> None:
    bundle, fisher_information = bundle_and_fisher
    # Statistics estimated with fisher_estimation.statistics: [input_abs_mean] (no A, no G).
    abs_only = {
        **calibration,
        "tensors": {k: v for k, v in calibration["tensors"].items() if "input_abs_mean" in k},
    }
    table = run_pipeline(bundle, fisher_information, tmp_path, PARAMS, abs_only).load("layer_risk")
    assert "svd_kronecker_loss" not in table.columns and "phi" in table.columns
    # One layer's G missing is enough to leave the column out (it is all layers or none).
    lacking = {
        **calibration,
        "tensors": {
            k: v
            for k, v in calibration["tensors"].items()
            if k != "bert.encoder.layer.1.attention.self.key.output_moment"
        },
    }
    table = run_pipeline(bundle, fisher_information, tmp_path, PARAMS, lacking).load("layer_risk")
    assert "svd_kronecker_loss" not in table.columns
    # Selected (the default), the error names what is missing and where it comes from.
    default = block_values("svd_risk")
    with pytest.raises(
        ValueError,
        match=r"'svd_kronecker_loss' needs the calibration statistics input_moment \(A\) and "
        r"output_moment \(G\) of every layer; calibration_statistics lacks "
        r"\['bert\.encoder\.layer\.1\.attention\.self\.key\.output_moment'\]; run "
        r"fisher_estimation with statistics including input_moment and output_moment",
    ):
        compute_layer_risk(
            bundle,
            fisher_information,
            lacking,
            SvdRiskParams.model_validate(default),
            COMPRESSION,
            "cpu",
        )
    with pytest.raises(ValueError, match=r"lacks \['bert\.encoder\.layer\.0\..*and 20 more"):
        compute_layer_risk(
            bundle,
            fisher_information,
            abs_only,
            SvdRiskParams.model_validate(default),
            COMPRESSION,
            "cpu",
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"statistic": "entropy"},
            r"svd_risk\.statistic='entropy'.*expected one of \['svd_kronecker_loss', 'phi'",
        ),
        ({"statistic": "top_share"}, r"svd_risk\.thresholds=.*thresholds\.top_share"),
        ({"thresholds": {"phi": 2.0, "fi": 1.0}}, r"svd_risk\.thresholds=.*known statistics"),
        ({"phi_threshold": 2.0}, "phi_threshold is now thresholds.phi"),
        (
            {"statistic": "svd_error_alignment", "compare_solvers": False},
            r"svd_risk\.statistic='svd_error_alignment'.*needs compare_solvers",
        ),
        ({"top_fraction": 0.0}, r"svd_risk\.top_fraction=0\.0: expected a number in \(0, 1\]"),
    ],
)
def test_the_svd_risk_block_rejects_bad_values_naming_the_key(change, message) -> None:
    with pytest.raises(ParameterError, match=message):
        SvdRiskParams.model_validate({**block_values("svd_risk"), **change})
