"""risk_validation on a tiny random BERT: per-layer damage against brute-force references."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import ParquetDataset
from matplotlib.figure import Figure
from scipy import stats

from tests.conftest import block_values, typed_params, varied_split
from tests.pipelines.conftest import BUDGET
from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.lowrank.compression import compress_model
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.layer import LowRankLinear, lowrank_modules
from weighted_lowrank.lowrank.risk import layer_statistics
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.parameters import ParameterError, RiskValidationParams
from weighted_lowrank.pipelines.risk_validation import create_pipeline
from weighted_lowrank.pipelines.risk_validation.nodes import (
    measure_layer_damage,
    summarize_risk_validation,
)
from weighted_lowrank.training import evaluate_classifier

MAX_LENGTH = 16
MODEL = typed_params("model", source="unused", max_length=MAX_LENGTH)


def options(**overrides) -> RiskValidationParams:
    """The typed risk_validation block (small batches) with ``overrides``."""
    return typed_params("risk_validation", **{"batch_size": 8, **overrides})


OPTIONS = options()


@pytest.fixture(scope="module")
def setup(factorized):
    """Dense model, its svd and tfwsvd compressed copies, the risk table and a validation split."""
    bundle, fisher_information, catalog = factorized
    fisher = fisher_information["tensors"]
    weights = {
        f"{name}.weight": module.weight.detach()
        for name, module in select_linear_modules(bundle.model).items()
    }
    risk = pd.DataFrame(layer_statistics(weights, fisher, budget=BUDGET, num_examples=4))
    risk = with_fingerprint(risk, model_fingerprint(bundle.model))  # as svd_risk writes it
    return {
        "bundle": bundle,
        "fisher": fisher,
        "svd": catalog.load("svd.compressed_model"),
        "tfwsvd": catalog.load("tfwsvd.compressed_model"),
        "layer_risk": risk,
        "validation": varied_split(40, seed=7),
    }


def measure(setup, svd=None, tfwsvd=None, layer_risk=None, validation=None, options=OPTIONS):
    return measure_layer_damage(
        setup["bundle"],
        svd or setup["svd"],
        tfwsvd or setup["tfwsvd"],
        setup["validation"] if validation is None else validation,
        setup["layer_risk"] if layer_risk is None else layer_risk,
        MODEL,
        options,
        "cpu",
    )


def evaluate(model, setup) -> dict[str, float]:
    return evaluate_classifier(
        model, setup["bundle"].tokenizer, setup["validation"], MAX_LENGTH, batch_size=8
    )


def test_exact_full_rank_factors_cause_no_damage(setup) -> None:
    exact = copy.deepcopy(setup["bundle"].model)
    for name, dense in select_linear_modules(exact).items():
        # W = W · I: a rank-in "factorization" that reproduces the layer exactly.
        eye = torch.eye(dense.in_features)
        exact.set_submodule(
            name, LowRankLinear.from_factors(dense.weight.detach(), eye, dense.bias.detach())
        )
    risk = setup["layer_risk"].assign(rank=setup["layer_risk"]["in_features"])
    bundle = ModelBundle(exact, setup["bundle"].tokenizer)
    table = measure(
        setup, svd=bundle, tfwsvd=bundle, layer_risk=risk, options=options(curvature=True)
    )
    for column in (
        "svd_loss_increase",
        "tfwsvd_loss_increase",
        "weighted_gain",
        "svd_first_order",
        "svd_curvature_damage",
    ):
        assert table[column].abs().max() < 1e-5, column
    assert (table["svd_accuracy_drop"] == 0).all() and (table["tfwsvd_accuracy_drop"] == 0).all()


def test_each_layer_matches_a_brute_force_single_layer_model(setup) -> None:
    table = measure(setup)
    dense = evaluate(setup["bundle"].model, setup)
    assert table["dense_loss"].iloc[0] == pytest.approx(dense["loss"], rel=1e-6)
    assert table["examples"].iloc[0] == 40
    assert table["module"].tolist() == setup["layer_risk"]["module"].tolist()
    weighted_layers = lowrank_modules(setup["tfwsvd"].model)
    for row in table.itertuples():
        # svd: factorize only this layer from scratch.
        alone, _ = compress_model(
            setup["bundle"].model, setup["fisher"], BUDGET, "svd", targets=[row.module]
        )
        svd = evaluate(alone, setup)
        # tfwsvd: the full compressed model with every other layer made dense again.
        weighted = copy.deepcopy(setup["tfwsvd"].model)
        for name in weighted_layers:
            if name != row.module:
                weighted.set_submodule(name, setup["bundle"].model.get_submodule(name))
        tfwsvd = evaluate(weighted, setup)
        assert row.svd_loss == pytest.approx(svd["loss"], rel=1e-5), row.module
        assert row.tfwsvd_loss == pytest.approx(tfwsvd["loss"], rel=1e-5), row.module
        assert row.svd_loss_increase == pytest.approx(svd["loss"] - dense["loss"], abs=1e-6)
        assert row.svd_accuracy_drop == pytest.approx(dense["accuracy"] - svd["accuracy"])
        assert row.tfwsvd_accuracy_drop == pytest.approx(dense["accuracy"] - tfwsvd["accuracy"])
        assert row.weighted_gain == pytest.approx(svd["loss"] - tfwsvd["loss"], abs=1e-6), (
            row.module
        )
        assert row.phi == setup["layer_risk"].set_index("module").loc[row.module, "phi"]
    assert table["svd_loss_increase"].abs().max() > 1e-4  # the test is not vacuous
    # The input model is untouched.
    assert not lowrank_modules(setup["bundle"].model)
    # Lineage: the table names the fine-tuned model it measured.
    assert fingerprint_of(table) == model_fingerprint(setup["bundle"].model)
    assert list(table.columns[-4:]) == ["seconds", "dense_loss", "dense_accuracy", "examples"]


def test_curvature_damage_is_the_even_part_of_the_mirrored_pair(setup) -> None:
    curvature = options(max_examples=24, curvature=True)
    table = measure(setup, options=curvature)
    frame = setup["validation"].head(24)
    dense = evaluate_classifier(setup["bundle"].model, setup["bundle"].tokenizer, frame, MAX_LENGTH)
    svd_layers = lowrank_modules(setup["svd"].model)
    for row in table.iloc[[0, 4, 11]].itertuples():
        mirrored = copy.deepcopy(setup["bundle"].model)
        weight = mirrored.get_submodule(row.module).weight
        with torch.no_grad():  # W + R = 2W − W_svd
            weight.copy_(2 * weight - svd_layers[row.module].dense_weight())
        mirror = evaluate_classifier(mirrored, setup["bundle"].tokenizer, frame, MAX_LENGTH)
        assert row.svd_mirror_loss == pytest.approx(mirror["loss"], rel=1e-5)
        assert row.svd_curvature_damage == pytest.approx(
            (row.svd_loss + mirror["loss"]) / 2 - dense["loss"], abs=1e-6
        )
        assert row.svd_first_order + row.svd_curvature_damage == pytest.approx(
            row.svd_loss_increase, abs=1e-6
        )
    summary = summarize_risk_validation(table, curvature)
    assert set(summary["correlations"]) == {
        "svd_loss_increase",
        "weighted_gain",
        "svd_curvature_damage",
    }


def test_summary_spearman_is_scipys_and_names_the_best_predictor(setup) -> None:
    table = measure(setup, options=options(max_examples=24))
    assert table["examples"].iloc[0] == 24
    summary = summarize_risk_validation(table, OPTIONS)
    assert summary["statistics"] == [
        "phi",
        "top_share",
        "max_to_mean",
        "svd_error_alignment",
        "svd_loss_rel_fwsvd",
        "svd_taylor_loss",
        "fwsvd_taylor_gain",
    ]
    for outcome in ("svd_loss_increase", "weighted_gain"):
        correlations = summary["correlations"][outcome]
        for statistic, value in correlations.items():
            expected = stats.spearmanr(table[statistic], table[outcome])
            assert value["rho"] == pytest.approx(expected.statistic, abs=1e-12)
            assert value["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
            assert value["n"] == len(table) == 12
        best = summary["best_predictor"][outcome]
        assert correlations[best]["rho"] == max(value["rho"] for value in correlations.values())
    json.dumps(summary, allow_nan=False)
    assert fingerprint_of(summary) == model_fingerprint(setup["bundle"].model)
    only = summarize_risk_validation(table, options(statistics=["phi"]))
    assert list(only["correlations"]["weighted_gain"]) == ["phi"]
    for wrong in ("entropy", "svd_loss", "module"):
        with pytest.raises(ValueError, match=rf"\['{wrong}'\] are not statistic columns"):
            summarize_risk_validation(table, options(statistics=[wrong]))


def test_inputs_of_another_budget_or_targets_are_rejected_before_any_evaluation(setup) -> None:
    """What lineage cannot tell: every input may come from the same fine-tuned model and still
    be compressed at another budget or with other targets."""
    # An empty validation split would fail later: the layer check must come first.
    empty = setup["validation"].iloc[:0]
    risk = setup["layer_risk"]
    with pytest.raises(ValueError, match="only in layer_risk \\[\\], only in the models \\['bert"):
        measure(setup, layer_risk=risk.iloc[1:], validation=empty)
    queries, _ = compress_model(
        setup["bundle"].model, setup["fisher"], BUDGET, "svd", targets="query$"
    )
    with pytest.raises(ValueError, match="differ: modules only in svd \\[\\], only in tfwsvd"):
        measure(setup, svd=ModelBundle(queries, None), validation=empty)
    smaller, _ = compress_model(setup["bundle"].model, setup["fisher"], 0.2, "svd")
    with pytest.raises(ValueError, match="ranks \\(svd, tfwsvd\\)"):
        measure(setup, svd=ModelBundle(smaller, None), validation=empty)
    wrong_rank = risk.assign(rank=risk["rank"] + 1)
    with pytest.raises(ValueError, match="layer_risk's ranks differ"):
        measure(setup, layer_risk=wrong_rank, validation=empty)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"curvature": 1}, r"risk_validation\.curvature=1: expected true or false"),
        ({"batch_size": 0}, r"risk_validation\.batch_size=0: expected a positive int"),
        ({"max_examples": 0}, r"risk_validation\.max_examples=0: expected a positive int or null"),
        (
            {"statistics": "phi"},
            r"risk_validation\.statistics='phi': expected a non-empty list of strings",
        ),
        ({"max_rows": 3}, r"risk_validation has unknown keys \['max_rows'\]"),
    ],
)
def test_the_risk_validation_block_rejects_bad_values_naming_the_key(overrides, message) -> None:
    with pytest.raises(ParameterError, match=message):
        RiskValidationParams.parse(block_values("risk_validation", **overrides), "risk_validation")


def test_pipeline_runs_from_an_in_memory_catalog(setup, tmp_path) -> None:
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(setup["bundle"], copy_mode="assign"),
            "svd.compressed_model": MemoryDataset(setup["svd"], copy_mode="assign"),
            "tfwsvd.compressed_model": MemoryDataset(setup["tfwsvd"], copy_mode="assign"),
            "validation_split": MemoryDataset(setup["validation"]),
            "layer_risk": MemoryDataset(setup["layer_risk"]),
            # Typed, as the TypedParameters hook hands them to the nodes in a run.
            "params:model": MemoryDataset(MODEL),
            "params:risk_validation": MemoryDataset(options(max_examples=16)),
            "params:device": MemoryDataset("cpu"),
            # Persisted as in conf/base (a MemoryDataset would be released once consumed).
            "risk_validation_table": ParquetDataset(filepath=str(tmp_path / "table.parquet")),
            "risk_validation_summary": JSONDataset(filepath=str(tmp_path / "summary.json")),
            "risk_validation_metrics": MemoryDataset(),
            "risk_validation_plot": MemoryDataset(copy_mode="assign"),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    table = catalog.load("risk_validation_table")
    summary = catalog.load("risk_validation_summary")
    metrics = catalog.load("risk_validation_metrics")
    figure = catalog.load("risk_validation_plot")
    assert len(table) == 12 and summary["examples"] == 16
    fingerprint = model_fingerprint(setup["bundle"].model)
    assert fingerprint_of(table) == fingerprint_of(summary) == fingerprint
    rho = summary["correlations"]["svd_loss_increase"]["phi"]["rho"]
    assert metrics["spearman_damage.phi"] == {"value": rho, "step": 0}
    assert metrics["dense_loss"]["value"] == pytest.approx(table["dense_loss"].iloc[0])
    assert isinstance(figure, Figure)
    assert "Spearman ρ = " in figure.axes[0].get_title()
    assert figure.axes[0].get_xscale() == "log"


def test_risk_validation_is_registered_but_not_in_default() -> None:
    from kedro.framework.project import configure_project

    from weighted_lowrank.pipeline_registry import register_pipelines

    configure_project("weighted_lowrank")
    pipelines = register_pipelines()
    default = {node.name for node in pipelines["__default__"].nodes}
    assert "measure_layer_damage" in {node.name for node in pipelines["risk_validation"].nodes}
    assert "measure_layer_damage" not in default and "compute_layer_risk" in default
