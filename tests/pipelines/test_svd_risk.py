"""svd_risk pipeline on a tiny random BERT and its Fisher, run from an in-memory catalog."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.pandas import ParquetDataset
from matplotlib.figure import Figure

from tests.conftest import make_tiny_bundle, varied_split
from weighted_lowrank.lowrank.batching import make_batches
from weighted_lowrank.lowrank.fisher import empirical_fisher, model_fingerprint
from weighted_lowrank.lowrank.risk import fisher_variance
from weighted_lowrank.pipelines.svd_risk import create_pipeline

PARAMS = {
    "statistic": "phi",
    "thresholds": {"phi": 2.0},
    "top_fraction": 0.01,
    "compare_solvers": True,
}


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


def run_pipeline(bundle, fisher_information, directory, params=PARAMS) -> DataCatalog:
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(bundle, copy_mode="assign"),
            "fisher_information": MemoryDataset(fisher_information, copy_mode="assign"),
            "params:svd_risk": MemoryDataset(params),
            "params:compression.budget": MemoryDataset(0.5),
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
    retrained = make_tiny_bundle(seed=6)
    with pytest.raises(Exception, match="was estimated on model"):
        run_pipeline(retrained, fisher_information, tmp_path)
    with pytest.raises(Exception, match="'tensors'"):
        run_pipeline(bundle, tensors, tmp_path)


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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"statistic": "entropy"}, r"'entropy' is unknown; expected one of \['phi', 'top_share'"),
        ({"statistic": "top_share"}, r"thresholds.top_share must be a number"),
        ({"thresholds": {"phi": 2.0, "fi": 1.0}}, r"unknown statistics \['fi'\]"),
        ({"phi_threshold": 2.0}, "phi_threshold is now thresholds.phi"),
        ({"statistic": "svd_error_alignment", "compare_solvers": False}, "needs compare_solvers"),
    ],
)
def test_bad_risk_rule_is_rejected_with_the_allowed_names(
    bundle_and_fisher, tmp_path, change, message
) -> None:
    bundle, fisher_information = bundle_and_fisher
    with pytest.raises(Exception, match=message):
        run_pipeline(bundle, fisher_information, tmp_path, {**PARAMS, **change})
