"""risk_validation on a tiny random BERT: per-layer and whole-model damage against brute-force
references, risk statistics and loss models against the measurements."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import ParquetDataset
from matplotlib.figure import Figure
from scipy import special, stats

from tests.conftest import block_values, make_tiny_bundle, typed_params, varied_split
from tests.pipelines.conftest import BUDGET, make_calibration_statistics
from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.hf.training import evaluate_classifier, predict_examples
from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import ParameterError, RiskValidationParams
from weighted_lowrank.lowrank.calibration import statistic_key
from weighted_lowrank.lowrank.compression import compress_model
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.layer import LowRankLinear, lowrank_modules
from weighted_lowrank.lowrank.loss_models import (
    LOSS_MODELS,
    LayerCurvature,
    predicted_loss_increase,
)
from weighted_lowrank.lowrank.risk import layer_statistics
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.pipelines.risk_validation import create_pipeline
from weighted_lowrank.pipelines.risk_validation.loss_model_nodes import (
    loss_model_metrics,
    summarize_loss_models,
)
from weighted_lowrank.pipelines.risk_validation.nodes import (
    WHOLE_MODEL,
    collect_damage,
    measure_damage,
    measure_dense_reference,
    predictive_kl,
)
from weighted_lowrank.pipelines.risk_validation.pipeline import REFERENCE, SOLVERS, WEIGHTED
from weighted_lowrank.pipelines.risk_validation.statistic_nodes import (
    summarize_risk_validation as summarize_statistics,
)

MAX_LENGTH = 16
MODEL = typed_params("model", source="unused", max_length=MAX_LENGTH)
#: What the φ-comparison tests measure (the cheapest valid run); the loss-model tests add fwsvd.
PHI_SOLVERS = ["svd", "tfwsvd"]
#: The two solvers of the φ comparison, as the pipeline binds them.
NAMES = {"reference": REFERENCE, "weighted": WEIGHTED}


def options(**overrides) -> RiskValidationParams:
    """The typed risk_validation block (small batches) with ``overrides``."""
    return typed_params("risk_validation", **{"batch_size": 8, **overrides})


def summarize_risk_validation(table, risk_validation):
    return summarize_statistics(table, risk_validation, **NAMES)


OPTIONS = options()


@pytest.fixture(scope="module")
def setup(factorized):
    """Dense model, its compressed copies, the risk table, statistics and a validation split."""
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
        "fisher_information": fisher_information,
        "calibration_statistics": make_calibration_statistics(bundle.model),
        "models": {solver: catalog.load(f"{solver}.compressed_model") for solver in SOLVERS},
        "layer_risk": risk,
        "validation": varied_split(40, seed=7),
    }


def measure(
    setup,
    svd=None,
    tfwsvd=None,
    layer_risk=None,
    validation=None,
    options=OPTIONS,
    calibration_statistics=None,
    solvers=PHI_SOLVERS,
):
    """Both tables of a run of the measuring nodes (dense reference, each solver of ``solvers``,
    collect); ``svd`` / ``tfwsvd`` replace those models."""
    models = {**setup["models"], **{k: v for k, v in (("svd", svd), ("tfwsvd", tfwsvd)) if v}}
    inputs = {
        "fine_tuned_model": setup["bundle"],
        "validation_split": setup["validation"] if validation is None else validation,
        "layer_risk": setup["layer_risk"] if layer_risk is None else layer_risk,
        "fisher_information": setup["fisher_information"],
        "calibration_statistics": setup["calibration_statistics"]
        if calibration_statistics is None
        else calibration_statistics,
        "model": MODEL,
        "risk_validation": options,
        "device": "cpu",
    }
    dense = measure_dense_reference(**inputs)
    damage = {
        solver: measure_damage(
            models[solver],
            **inputs,
            dense_reference=dense,
            solver=solver,
            mirror=solver == REFERENCE,
        )
        for solver in solvers
    }
    return collect_damage(inputs["layer_risk"], dense, **NAMES, **damage)


def evaluate(model, setup) -> dict[str, float]:
    return evaluate_classifier(
        model, setup["bundle"].tokenizer, setup["validation"], MAX_LENGTH, batch_size=8
    )


def kl_from(dense, model, tokenizer, frame) -> float:
    """Mean KL(p_dense ‖ p_model) over ``frame``, from each model's own pass (scipy's softmax and
    relative entropy, independently of the node)."""
    p, q = (
        special.softmax(
            predict_examples(net, tokenizer, frame, MAX_LENGTH, 8).logits.astype(np.float64), axis=1
        )
        for net in (dense, model)
    )
    return float(special.rel_entr(p, q).sum(axis=1).mean())


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
    table, losses = measure(
        setup, svd=bundle, tfwsvd=bundle, layer_risk=risk, options=options(curvature=True)
    )
    for column in (
        "svd_kl",
        "tfwsvd_kl",
        "svd_loss_increase",
        "tfwsvd_loss_increase",
        "weighted_gain",
        "svd_first_order",
        "svd_curvature_damage",
    ):
        assert table[column].abs().max() < 1e-5, column
    assert (table["svd_accuracy_drop"] == 0).all() and (table["tfwsvd_accuracy_drop"] == 0).all()
    # ΔW = 0: every loss model predicts no damage, per layer and for the whole model.
    assert (losses["predicted"] == 0).all() and losses["measured"].abs().max() < 1e-5
    # The swap leaves the predictions as they were (up to float rounding): no KL.
    assert (losses["measured_kl"] >= 0).all() and losses["measured_kl"].max() < 1e-10
    assert table[["svd_kl", "tfwsvd_kl"]].to_numpy().max() < 1e-10


def test_each_layer_matches_a_brute_force_single_layer_model(setup) -> None:
    table, _ = measure(setup)
    dense = evaluate(setup["bundle"].model, setup)
    assert table["dense_loss"].iloc[0] == pytest.approx(dense["loss"], rel=1e-6)
    assert table["examples"].iloc[0] == 40
    assert table["module"].tolist() == setup["layer_risk"]["module"].tolist()
    weighted_layers = lowrank_modules(setup["models"]["tfwsvd"].model)
    for row in table.itertuples():
        # svd: factorize only this layer from scratch.
        alone, _ = compress_model(
            setup["bundle"].model, setup["fisher"], BUDGET, "svd", targets=[row.module]
        )
        svd = evaluate(alone, setup)
        # tfwsvd: the full compressed model with every other layer made dense again.
        weighted = copy.deepcopy(setup["models"]["tfwsvd"].model)
        for name in weighted_layers:
            if name != row.module:
                weighted.set_submodule(name, setup["bundle"].model.get_submodule(name))
        tfwsvd = evaluate(weighted, setup)
        assert row.svd_loss == pytest.approx(svd["loss"], rel=1e-5), row.module
        assert row.tfwsvd_loss == pytest.approx(tfwsvd["loss"], rel=1e-5), row.module
        tokenizer, frame = setup["bundle"].tokenizer, setup["validation"]
        assert row.svd_kl == pytest.approx(
            kl_from(setup["bundle"].model, alone, tokenizer, frame), rel=1e-4, abs=1e-9
        ), row.module
        assert row.tfwsvd_kl == pytest.approx(
            kl_from(setup["bundle"].model, weighted, tokenizer, frame), rel=1e-4, abs=1e-9
        ), row.module
        assert row.svd_loss_increase == pytest.approx(svd["loss"] - dense["loss"], abs=1e-6)
        assert row.svd_accuracy_drop == pytest.approx(dense["accuracy"] - svd["accuracy"])
        assert row.tfwsvd_accuracy_drop == pytest.approx(dense["accuracy"] - tfwsvd["accuracy"])
        assert row.weighted_gain == pytest.approx(svd["loss"] - tfwsvd["loss"], abs=1e-6), (
            row.module
        )
        assert row.phi == setup["layer_risk"].set_index("module").loc[row.module, "phi"]
    assert table["svd_loss_increase"].abs().max() > 1e-4  # the test is not vacuous
    assert (table[["svd_kl", "tfwsvd_kl"]] > 0).all().all() and table["svd_kl"].max() > 1e-6
    # The input model is untouched.
    assert not lowrank_modules(setup["bundle"].model)
    # Lineage: the table names the fine-tuned model it measured.
    assert fingerprint_of(table) == model_fingerprint(setup["bundle"].model)
    assert list(table.columns[-4:]) == ["seconds", "dense_loss", "dense_accuracy", "examples"]


def test_curvature_damage_is_the_even_part_of_the_mirrored_pair(setup) -> None:
    curvature = options(max_examples=24, curvature=True)
    table, _ = measure(setup, options=curvature)
    frame = setup["validation"].head(24)
    dense = evaluate_classifier(setup["bundle"].model, setup["bundle"].tokenizer, frame, MAX_LENGTH)
    svd_layers = lowrank_modules(setup["models"]["svd"].model)
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
        "svd_kl",
        "svd_loss_increase",
        "weighted_gain",
        "svd_curvature_damage",
    }


def test_summary_spearman_is_scipys_and_names_the_best_predictor(setup) -> None:
    table, _ = measure(setup, options=options(max_examples=24))
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
    assert list(summary["correlations"]) == ["svd_kl", "svd_loss_increase", "weighted_gain"]
    for outcome in ("svd_kl", "svd_loss_increase", "weighted_gain"):
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
    dense = measure_dense_reference(
        setup["bundle"],
        setup["validation"],
        setup["layer_risk"],
        setup["fisher_information"],
        setup["calibration_statistics"],
        MODEL,
        OPTIONS,
        "cpu",
    )

    def damage(solver, model=None, layer_risk=setup["layer_risk"]):
        # An empty validation split would fail later: the layer check must come first.
        return measure_damage(
            model or setup["models"][solver],
            dense,
            setup["bundle"],
            setup["validation"].iloc[:0],
            layer_risk,
            setup["fisher_information"],
            setup["calibration_statistics"],
            MODEL,
            OPTIONS,
            "cpu",
            solver=solver,
        )

    risk = setup["layer_risk"]
    with pytest.raises(
        ValueError,
        match=r"layer_risk and svd.compressed_model differ: modules only in layer_risk \[\], "
        r"only in the model \['bert",
    ):
        damage("svd", layer_risk=risk.iloc[1:])
    queries, _ = compress_model(
        setup["bundle"].model, setup["fisher"], BUDGET, "svd", targets="query$"
    )
    with pytest.raises(ValueError, match=r"only in layer_risk \['bert.*only in the model \[\]"):
        damage("svd", ModelBundle(queries, None))
    smaller, _ = compress_model(setup["bundle"].model, setup["fisher"], 0.2, "svd")
    with pytest.raises(ValueError, match=r"tfwsvd.compressed_model differ: .*ranks \(layer_risk"):
        damage("tfwsvd", ModelBundle(smaller, None))
    wrong_rank = risk.assign(rank=risk["rank"] + 1)
    with pytest.raises(ValueError, match=r"ranks \(layer_risk, model\) \{'bert"):
        damage("svd", layer_risk=wrong_rank)
    with pytest.raises(ValueError, match="duplicated layer_risk rows"):
        damage("svd", layer_risk=pd.concat([risk, risk.iloc[:1]]))


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
        (
            {"loss_models": "kronecker"},
            r"risk_validation\.loss_models='kronecker': expected a non-empty list of strings or null",
        ),
    ],
)
def test_the_risk_validation_block_rejects_bad_values_naming_the_key(overrides, message) -> None:
    with pytest.raises(ParameterError, match=message):
        RiskValidationParams.model_validate(block_values("risk_validation", **overrides))


LOSS_SOLVERS = ["svd", "fwsvd", "tfwsvd"]


@pytest.fixture(scope="module")
def loss_run(setup):
    """Both tables of one run measuring three solvers on 24 examples."""
    return measure(setup, options=options(max_examples=24), solvers=LOSS_SOLVERS)


def curvature_of(setup, module: str) -> LayerCurvature:
    """The layer's statistics per example, read independently of the node."""
    tensors = setup["calibration_statistics"]["tensors"]
    examples = int(setup["fisher_information"]["metadata"]["num_examples"])
    return LayerCurvature(
        fisher=setup["fisher"][f"{module}.weight"] / examples,
        input_moment=tensors[statistic_key(module, "input_moment")],
        output_moment=tensors[statistic_key(module, "output_moment")],
    )


def test_loss_model_rows_match_independent_evaluations_and_the_core_predictions(
    setup, loss_run
) -> None:
    table, losses = loss_run
    frame, tokenizer = setup["validation"].head(24), setup["bundle"].tokenizer
    dense_model = setup["bundle"].model
    dense = evaluate_classifier(dense_model, tokenizer, frame, MAX_LENGTH)["loss"]
    layers = losses[losses["scope"] == "layer"]
    assert len(layers) == 12 * len(LOSS_SOLVERS) * len(LOSS_MODELS)
    for (module, solver), rows in layers.groupby(["module", "solver"]):
        layer = lowrank_modules(setup["models"][solver].model)[module]
        alone = copy.deepcopy(dense_model)
        alone.set_submodule(module, copy.deepcopy(layer))
        loss = evaluate_classifier(alone, tokenizer, frame, MAX_LENGTH)["loss"]
        assert rows["measured"].tolist() == pytest.approx([loss - dense] * 5, abs=1e-6), module
        kl = kl_from(dense_model, alone, tokenizer, frame)
        assert rows["measured_kl"].tolist() == pytest.approx([kl] * 5, rel=1e-4), module
        with torch.no_grad():
            delta = (
                dense_model.get_submodule(module).weight.double() - layer.dense_weight().double()
            )
        expected = predicted_loss_increase(delta, curvature_of(setup, module))
        assert dict(zip(rows["loss_model"], rows["predicted"], strict=True)) == pytest.approx(
            expected, rel=1e-9
        )
    # The φ table's SVD damage is the very same measurement.
    svd = layers[(layers["solver"] == "svd") & (layers["loss_model"] == "identity")]
    assert svd["module"].tolist() == table["module"].tolist()
    assert svd["measured"].tolist() == pytest.approx(table["svd_loss_increase"].tolist(), abs=1e-12)
    whole = losses[losses["scope"] == "model"]
    assert len(whole) == len(LOSS_SOLVERS) * len(LOSS_MODELS)
    assert set(whole["module"]) == {WHOLE_MODEL}
    for solver in LOSS_SOLVERS:
        compressed = copy.deepcopy(setup["models"][solver].model)
        loss = evaluate_classifier(compressed, tokenizer, frame, MAX_LENGTH)["loss"]
        rows = whole[whole["solver"] == solver].set_index("loss_model")
        assert rows["measured"].tolist() == pytest.approx([loss - dense] * 5, abs=1e-6), solver
        kl = kl_from(dense_model, compressed, tokenizer, frame)
        assert rows["measured_kl"].tolist() == pytest.approx([kl] * 5, rel=1e-4), solver
        # A whole model's prediction is the sum of its layers' predictions.
        sums = layers[layers["solver"] == solver].groupby("loss_model")["predicted"].sum()
        assert rows["predicted"].to_dict() == pytest.approx(sums.to_dict(), rel=1e-12)
    assert whole["measured"].abs().min() > 1e-4 and (losses["predicted"] > 0).all()
    assert losses["ratio"].to_numpy() == pytest.approx(
        (losses["predicted"] / losses["measured"]).to_numpy()
    )
    assert (losses["measured_kl"] > 0).all()
    assert losses["ratio_kl"].to_numpy() == pytest.approx(
        (losses["predicted"] / losses["measured_kl"]).to_numpy()
    )
    # The φ table's SVD KL is the very same measurement.
    assert svd["measured_kl"].tolist() == pytest.approx(table["svd_kl"].tolist(), abs=1e-15)
    assert fingerprint_of(losses) == model_fingerprint(dense_model)


@pytest.mark.parametrize(
    ("block", "measured", "outcome"),
    [
        ((), "measured_kl", "svd_kl"),
        (("vs_loss_increase",), "measured", "svd_loss_increase"),
    ],
)
def test_loss_model_summary_is_scipys_spearman_and_numpys_ratios(
    setup, loss_run, block, measured, outcome
) -> None:
    """The KL block (top level, primary) and the loss-increase block read their own column."""
    table, losses = loss_run
    full = summarize_loss_models(losses, table, reference=REFERENCE)
    summary = full
    for key in block:
        summary = summary[key]
    layers = losses[losses["scope"] == "layer"]
    for model in LOSS_MODELS:
        rows = layers[layers["loss_model"] == model]
        pooled = summary["per_layer"][model]["pooled"]
        expected = stats.spearmanr(rows["predicted"], rows[measured])
        assert pooled["rho"] == pytest.approx(expected.statistic, abs=1e-12)
        assert pooled["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert pooled["n"] == 12 * len(LOSS_SOLVERS)
        positive = rows[rows[measured] > 0]
        ratios = positive["predicted"] / positive[measured]
        assert pooled["ratio_n"] == len(positive) and len(positive) > 3
        assert pooled["negative_measured"] == len(rows) - len(positive)
        assert pooled["ratio_median"] == pytest.approx(ratios.median())
        assert pooled["ratio_q25"] == pytest.approx(ratios.quantile(0.25))
        assert pooled["ratio_q75"] == pytest.approx(ratios.quantile(0.75))
        for solver in LOSS_SOLVERS:
            subset = rows[rows["solver"] == solver]
            expected = stats.spearmanr(subset["predicted"], subset[measured])
            by_solver = summary["per_layer"][model]["by_solver"][solver]
            assert by_solver["rho"] == pytest.approx(expected.statistic, abs=1e-12)
        whole = summary["whole_model"][model]
        assert whole["n"] == len(LOSS_SOLVERS) and set(whole["by_solver"]) == set(LOSS_SOLVERS)
        points = losses[(losses["scope"] == "model") & (losses["loss_model"] == model)]
        assert {solver: value[measured] for solver, value in whole["by_solver"].items()} == dict(
            zip(points["solver"], points[measured], strict=True)
        )
    if measured == "measured_kl":
        # Every KL is positive: no row is left out of the ratios.
        assert pooled["negative_measured"] == 0 and pooled["ratio_n"] == pooled["n"]
    best = summary["best_loss_model"]
    pooled = {model: value["pooled"]["rho"] for model, value in summary["per_layer"].items()}
    assert pooled[best] == max(pooled.values())
    comparison = summary["phi_comparison"]
    phi = summarize_risk_validation(table, OPTIONS)["correlations"][outcome]["phi"]
    assert comparison["loss_model"] == best and comparison["outcome"] == measured
    assert comparison["phi"] == pytest.approx(phi)
    svd = summary["per_layer"][best]["by_solver"]["svd"]
    assert comparison["best"] == pytest.approx({key: svd[key] for key in ("rho", "p_value", "n")})
    better = comparison["best"]["rho"] > phi["rho"]
    assert comparison["loss_model_better"] is better
    assert comparison["verdict"].startswith(
        f"{best} {'predicts' if better else 'does not predict'} SVD's per-layer "
        + ("KL" if measured == "measured_kl" else "validation-loss increase")
    )
    assert full["skipped_loss_models"] == {} and full["solvers"] == LOSS_SOLVERS
    assert full["outcome"] == "measured_kl"
    json.dumps(full, allow_nan=False)
    assert fingerprint_of(full) == model_fingerprint(setup["bundle"].model)
    # MLflow names: "_kl" for the KL block; the loss-increase block keeps the earlier names.
    suffix = "_kl" if measured == "measured_kl" else ""
    metrics = loss_model_metrics(full, reference=REFERENCE)
    for model in LOSS_MODELS:
        value = summary["per_layer"][model]
        assert metrics[f"{model}.spearman{suffix}"]["value"] == value["pooled"]["rho"]
        assert metrics[f"{model}.ratio{suffix}_median"]["value"] == value["pooled"]["ratio_median"]
        assert (
            metrics[f"{model}.svd.p_value{suffix}"]["value"] == value["by_solver"]["svd"]["p_value"]
        )
        whole = summary["whole_model"][model]["rho"]
        assert metrics[f"{model}.whole_model.spearman{suffix}"]["value"] == whole
    assert metrics[f"phi_svd.spearman{suffix}"]["value"] == phi["rho"]
    assert metrics[f"beats_phi{suffix}"]["value"] == float(better)


def test_predictive_kl_is_each_heads_divergence() -> None:
    """Classification, multi-label and regression heads against closed forms; never negative, and
    zero between equal predictions."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    categorical = make_tiny_bundle(num_labels=3).model.config
    p, q = special.softmax(a, axis=1), special.softmax(b, axis=1)
    expected = (p * np.log(p / q)).sum(axis=1)
    assert predictive_kl(a, b, categorical) == pytest.approx(expected, rel=1e-12)
    multi = copy.deepcopy(categorical)
    multi.problem_type = "multi_label_classification"
    p, q = special.expit(a), special.expit(b)
    bernoulli = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    assert predictive_kl(a, b, multi) == pytest.approx(bernoulli.sum(axis=1), rel=1e-12)
    regression = make_tiny_bundle(num_labels=1).model.config
    assert predictive_kl(a[:, :1], b[:, :1], regression) == pytest.approx(
        0.5 * (a[:, 0] - b[:, 0]) ** 2, rel=1e-12
    )
    for config, width in ((categorical, 3), (multi, 3), (regression, 1)):
        values = predictive_kl(a[:, :width], b[:, :width], config)
        assert (values > 0).all()
        # Equal logits, and float32 logits a rounding apart: zero, never below.
        assert (predictive_kl(a[:, :width], a[:, :width], config) == 0).all()
        near = a[:, :width].astype(np.float32)
        assert (predictive_kl(near, np.nextafter(near, np.float32(np.inf)), config) >= 0).all()
    with pytest.raises(ValueError, match=r"logits of shapes \(7, 3\) and \(7, 2\)"):
        predictive_kl(a, b[:, :2], categorical)


@pytest.mark.parametrize(
    ("solvers", "message"),
    [
        (
            ("svd", "tfwsvd", "newton"),
            r"risk_validation solvers \['svd', 'tfwsvd', 'newton'\]: unknown \['newton'\]; "
            r"expected distinct solvers of \['svd', 'fwsvd', .*\] including svd and tfwsvd",
        ),
        (("svd", "tfwsvd", "svd"), r": repeated \['svd'\]; expected distinct"),
        (("svd", "fwsvd"), r"\['svd', 'fwsvd'\]: missing \['tfwsvd'\]; expected"),
    ],
)
def test_bad_solver_lists_are_rejected_when_the_pipeline_is_built(solvers, message) -> None:
    with pytest.raises(ValueError, match=message):
        create_pipeline(solvers=solvers)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"loss_models": ["kronecker", "hessian"]},
            r"risk_validation\.loss_models=\['kronecker', 'hessian'\] names \['hessian'\] unknown "
            r"or more than once; expected distinct names among \['identity'",
        ),
        (
            {"loss_models": ["diagonal", "diagonal"]},
            r"loss_models=\['diagonal', 'diagonal'\] names \['diagonal'\] unknown or more than once",
        ),
    ],
)
def test_bad_requests_are_rejected_before_any_evaluation(setup, overrides, message) -> None:
    empty = setup["validation"].iloc[:0]  # would fail at the first evaluation
    with pytest.raises(ValueError, match=message):
        measure(setup, validation=empty, options=options(**overrides))


def test_loss_models_without_statistics_are_named_or_skipped(setup, caplog) -> None:
    empty = setup["validation"].iloc[:0]
    calibration = setup["calibration_statistics"]
    no_gradients = {
        **calibration,
        "tensors": {
            key: value
            for key, value in calibration["tensors"].items()
            if not key.endswith(".output_moment")
        },
    }
    with pytest.raises(
        ValueError,
        match=r"loss_models \['kronecker'\] lack statistics: kronecker needs calibration_statistics "
        r"'<module>\.output_moment' \(absent: \['bert\.encoder\.layer\.0\.attention\.self\.query"
        r"\.output_moment', .* and 9 more\)",
    ):
        measure(
            setup,
            validation=empty,
            options=options(loss_models=["diagonal", "kronecker"]),
            calibration_statistics=no_gradients,
        )
    no_count = {**setup["fisher_information"], "metadata": {}}
    with pytest.raises(
        ValueError,
        match=r"no loss model can be computed: identity needs "
        r"fisher_information '<module>\.weight' and its metadata num_examples \(absent: "
        r"\['metadata num_examples'\]\)",
    ):
        measure_dense_reference(
            setup["bundle"],
            empty,
            setup["layer_risk"],
            no_count,
            {"tensors": {}, "metadata": {}},
            MODEL,
            OPTIONS,
            "cpu",
        )
    # By default the loss models the statistics allow are computed, and the others named.
    with caplog.at_level("WARNING"):
        table, losses = measure(
            setup, options=options(max_examples=8), calibration_statistics=no_gradients
        )
    assert "skipping loss models ['kronecker', 'activation']" in caplog.text
    assert list(dict.fromkeys(losses["loss_model"])) == ["identity", "fwsvd", "diagonal"]
    summary = summarize_loss_models(losses, table, reference=REFERENCE)
    assert summary["skipped_loss_models"] == {
        "kronecker": ["input_moment", "output_moment"],
        "activation": ["input_moment", "output_moment"],
    }


def test_only_the_wired_solvers_are_loaded_one_namespace_each() -> None:
    """The default wires one namespace per solver of ``SOLVERS``; another list wires only its
    own models."""
    for solvers in (SOLVERS, tuple(LOSS_SOLVERS)):
        pipeline = create_pipeline() if solvers == SOLVERS else create_pipeline(solvers=solvers)
        models = {name for name in pipeline.inputs() if name.endswith(".compressed_model")}
        assert models == {f"{solver}.compressed_model" for solver in solvers}
        namespaced = sorted(node.name for node in pipeline.nodes if node.namespace)
        assert namespaced == sorted(f"{solver}.measure_damage" for solver in solvers)
        collect = next(node for node in pipeline.nodes if node.name == "collect_damage")
        assert collect.outputs == ["risk_validation_table", "loss_model_table"]


def test_pipeline_runs_from_an_in_memory_catalog(setup, tmp_path) -> None:
    models = {
        f"{solver}.compressed_model": MemoryDataset(setup["models"][solver], copy_mode="assign")
        for solver in LOSS_SOLVERS
    }
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(setup["bundle"], copy_mode="assign"),
            **models,
            "validation_split": MemoryDataset(setup["validation"]),
            "layer_risk": MemoryDataset(setup["layer_risk"]),
            "fisher_information": MemoryDataset(setup["fisher_information"]),
            "calibration_statistics": MemoryDataset(setup["calibration_statistics"]),
            # Typed, as the TypedParameters hook hands them to the nodes in a run.
            "params:model": MemoryDataset(MODEL),
            "params:risk_validation": MemoryDataset(options(max_examples=16)),
            "params:device": MemoryDataset("cpu"),
            # Persisted as in conf/base (a MemoryDataset would be released once consumed).
            "risk_validation_table": ParquetDataset(filepath=str(tmp_path / "table.parquet")),
            "risk_validation_summary": JSONDataset(filepath=str(tmp_path / "summary.json")),
            "risk_validation_metrics": MemoryDataset(),
            "risk_validation_plot": MemoryDataset(copy_mode="assign"),
            "loss_model_table": ParquetDataset(filepath=str(tmp_path / "losses.parquet")),
            "loss_model_summary": JSONDataset(filepath=str(tmp_path / "losses.json")),
            "loss_model_metrics": MemoryDataset(),
            "loss_model_plot": MemoryDataset(copy_mode="assign"),
        }
    )
    SequentialRunner().run(create_pipeline(solvers=tuple(LOSS_SOLVERS)), catalog)
    table = catalog.load("risk_validation_table")
    summary = catalog.load("risk_validation_summary")
    metrics = catalog.load("risk_validation_metrics")
    figure = catalog.load("risk_validation_plot")
    assert len(table) == 12 and summary["examples"] == 16
    fingerprint = model_fingerprint(setup["bundle"].model)
    assert fingerprint_of(table) == fingerprint_of(summary) == fingerprint
    rho = summary["correlations"]["svd_loss_increase"]["phi"]["rho"]
    assert metrics["spearman_damage.phi"] == {"value": rho, "step": 0}
    rho = summary["correlations"]["svd_kl"]["phi"]["rho"]
    assert metrics["spearman_kl.phi"] == {"value": rho, "step": 0}
    assert metrics["svd_kl_sum"]["value"] == pytest.approx(table["svd_kl"].sum())
    assert metrics["dense_loss"]["value"] == pytest.approx(table["dense_loss"].iloc[0])
    assert isinstance(figure, Figure)
    assert "Spearman ρ = " in figure.axes[0].get_title()
    assert figure.axes[0].get_xscale() == "log"

    losses = catalog.load("loss_model_table")
    loss_summary = catalog.load("loss_model_summary")
    loss_metrics = catalog.load("loss_model_metrics")
    loss_figure = catalog.load("loss_model_plot")
    # 12 layers × 3 solvers × 5 loss models, then 3 whole models × 5 loss models.
    assert len(losses) == 12 * 3 * 5 + 3 * 5
    assert fingerprint_of(losses) == fingerprint_of(loss_summary) == fingerprint
    assert loss_summary["loss_models"] == list(LOSS_MODELS) and loss_summary["examples"] == 16
    pooled = loss_summary["per_layer"]["kronecker"]["pooled"]
    assert loss_metrics["kronecker.spearman_kl"] == {"value": pooled["rho"], "step": 0}
    pooled = loss_summary["vs_loss_increase"]["per_layer"]["kronecker"]["pooled"]
    assert loss_metrics["kronecker.spearman"] == {"value": pooled["rho"], "step": 0}
    for name in ("kronecker.fwsvd.spearman", "diagonal.whole_model.spearman", "beats_phi"):
        assert name in loss_metrics and name.replace("spearman", "spearman_kl") in loss_metrics
    assert "beats_phi_kl" in loss_metrics
    panels = [axes for axes in loss_figure.axes if axes.get_visible()]
    # Top row against the KL, bottom row against the loss increase.
    assert [axes.get_title().split(":")[0] for axes in panels] == [
        f"{model} vs {outcome}" for outcome in ("KL", "loss increase") for model in LOSS_MODELS
    ]
    assert panels[0].get_yscale() == "log"  # every KL is positive
    assert panels[0].get_xscale() == "log"


def test_risk_validation_is_registered_but_not_in_default() -> None:
    from kedro.framework.project import configure_project

    from weighted_lowrank.pipeline_registry import register_pipelines

    configure_project("weighted_lowrank")
    pipelines = register_pipelines()
    default = {node.name for node in pipelines["__default__"].nodes}
    assert "collect_damage" in {node.name for node in pipelines["risk_validation"].nodes}
    assert "collect_damage" not in default and "compute_layer_risk" in default
