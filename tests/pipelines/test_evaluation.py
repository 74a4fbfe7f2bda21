"""The evaluation pipeline on a tiny random BERT: metrics recomputed by hand, same keys everywhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.runner import SequentialRunner
from safetensors.torch import load_file
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tests.conftest import TOY_NEGATIVE, TOY_POSITIVE, make_tiny_bundle
from weighted_lowrank.latency import measure_latency_ms
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.lowrank.surgery import WEIGHTS_FILE, compress_model, save_compressed
from weighted_lowrank.pipelines.evaluation import create_pipeline as create_evaluation
from weighted_lowrank.pipelines.evaluation.nodes import evaluate_compressed, evaluate_dense
from weighted_lowrank.pipelines.refinement import create_pipeline as create_refinement

MAX_LENGTH = 16
EVALUATION = {
    "batch_size": 4,
    "device": "cpu",
    "latency": {
        "batch_size": 2,
        "sequence_length": 8,
        "repeats": 3,
        "warmup": 1,
        "threads": None,
        "seed": 0,
    },
}
TEST_SPLIT = pd.DataFrame(
    {
        "text": TOY_POSITIVE
        + TOY_NEGATIVE
        + ["fine plot", "dull plot", "great movie", "awful film"],
        "label": [1, 1, 1, 0, 0, 0, 1, 0, 1, 0],
    }
)
REFINEMENT_OFF = {"enabled": False}
NOT_REFINED = {"enabled": False, "trainable": "all", "epochs": []}
CLASSIFICATION_KEYS = {"accuracy", "f1", "mcc"}
COMMON_KEYS = {
    "test_loss",
    "weighted_loss_rel_svd",
    "params_kept",
    "params_model",
    "params_ratio_layers",
    "params_ratio_model",
    "size_on_disk_bytes",
    "latency_ms",
    "latency_dense_ms",
    "latency_ratio",
    "factorization_seconds",
}


def logits_by_hand(bundle, frame: pd.DataFrame) -> np.ndarray:
    batch = bundle.tokenizer(
        frame["text"].tolist(),
        padding=True,
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="pt",
    )
    with torch.no_grad():
        return bundle.model.eval()(**batch).logits.numpy()


@pytest.fixture(scope="module")
def evaluated(factorized):
    bundle, _, catalog = factorized
    catalog["test_split"] = TEST_SPLIT
    catalog["params:model"] = {"source": "unused", "max_length": MAX_LENGTH}
    catalog["params:evaluation"] = EVALUATION
    catalog["params:refinement"] = REFINEMENT_OFF
    catalog["params:seed"] = 0
    catalog["params:device"] = "cpu"
    catalog["train_split"] = catalog["validation_split"] = TEST_SPLIT
    SequentialRunner().run(create_refinement() + create_evaluation(), catalog)
    return bundle, catalog


def test_namespaces_for_dense_and_every_solver():
    pipeline = create_evaluation()
    assert {node.name for node in pipeline.nodes} == {
        f"{name}.evaluate" for name in ("dense", *SOLVERS)
    }
    assert pipeline.outputs() == {f"{name}.evaluation_metrics" for name in ("dense", *SOLVERS)}
    assert {f"{solver}.refined_model" for solver in SOLVERS} <= pipeline.inputs()


def test_every_namespace_reports_the_same_flat_float_keys(evaluated):
    _, catalog = evaluated
    for name in ("dense", *SOLVERS):
        metrics = catalog.load(f"{name}.evaluation_metrics")
        assert set(metrics) == CLASSIFICATION_KEYS | COMMON_KEYS, name
        assert all(isinstance(value, float) and np.isfinite(value) for value in metrics.values()), (
            name
        )


def test_svd_metrics_match_a_recomputation_by_hand(evaluated, tmp_path):
    _, catalog = evaluated
    compressed = catalog.load("svd.compressed_model")
    report = catalog.load("svd.layer_report")
    metrics = catalog.load("svd.evaluation_metrics")
    predictions = logits_by_hand(compressed, TEST_SPLIT).argmax(axis=1)
    labels = TEST_SPLIT["label"].to_numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(labels, predictions))
    assert metrics["weighted_loss_rel_svd"] == pytest.approx(1.0)
    save_compressed(compressed.model, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert metrics["size_on_disk_bytes"] == (tmp_path / WEIGHTS_FILE).stat().st_size
    assert metrics["params_model"] == sum(tensor.numel() for tensor in saved.values())
    assert metrics["params_kept"] == report["params_after"].sum()
    assert metrics["params_ratio_layers"] == pytest.approx(
        report["params_after"].sum() / report["params_before"].sum()
    )
    assert metrics["factorization_seconds"] == report["total_seconds"].iloc[0]
    assert metrics["latency_ratio"] == pytest.approx(
        metrics["latency_ms"] / metrics["latency_dense_ms"]
    )


def test_dense_and_compressed_counts_are_consistent(evaluated):
    bundle, catalog = evaluated
    dense = catalog.load("dense.evaluation_metrics")
    predictions = logits_by_hand(bundle, TEST_SPLIT).argmax(axis=1)
    assert dense["accuracy"] == pytest.approx(accuracy_score(TEST_SPLIT["label"], predictions))
    assert dense["params_model"] == sum(p.numel() for p in bundle.model.parameters())
    assert (dense["params_ratio_layers"], dense["params_ratio_model"], dense["latency_ratio"]) == (
        1.0,
        1.0,
        1.0,
    )
    assert (dense["weighted_loss_rel_svd"], dense["factorization_seconds"]) == (0.0, 0.0)
    for solver in SOLVERS:
        metrics = catalog.load(f"{solver}.evaluation_metrics")
        saved_layers = dense["params_kept"] - metrics["params_kept"]
        assert metrics["params_model"] == dense["params_model"] - saved_layers, solver
        assert metrics["params_ratio_layers"] == pytest.approx(
            metrics["params_kept"] / dense["params_kept"]
        )
        assert metrics["params_ratio_model"] == pytest.approx(
            metrics["params_model"] / dense["params_model"]
        )
        assert metrics["size_on_disk_bytes"] < dense["size_on_disk_bytes"], solver


def test_a_report_from_another_run_is_rejected(evaluated):
    bundle, catalog = evaluated
    report = catalog.load("svd.layer_report")
    report.loc[0, "rank"] += 1
    with pytest.raises(ValueError, match="layer_report"):
        evaluate_compressed(
            catalog.load("svd.compressed_model"),
            bundle,
            report,
            TEST_SPLIT,
            {"max_length": MAX_LENGTH},
            EVALUATION,
            catalog.load("svd.compressed_model"),
            NOT_REFINED,
            REFINEMENT_OFF,
        )


def test_regression_reports_pearson_and_spearman():
    bundle = make_tiny_bundle(num_labels=1, seed=5)
    frame = TEST_SPLIT.assign(label=np.linspace(0.0, 5.0, len(TEST_SPLIT)))
    compressed, report = compress_model(bundle.model, None, 0.5, "svd")
    compressed_bundle = type(bundle)(model=compressed, tokenizer=bundle.tokenizer)
    model_params = {"max_length": MAX_LENGTH}
    dense = evaluate_dense(
        bundle, frame, model_params, EVALUATION, {"targets": None}, REFINEMENT_OFF
    )
    metrics = evaluate_compressed(
        compressed_bundle,
        bundle,
        pd.DataFrame(report),
        frame,
        model_params,
        EVALUATION,
        compressed_bundle,
        NOT_REFINED,
        REFINEMENT_OFF,
    )
    assert set(dense) == set(metrics) == {"pearson", "spearman"} | COMMON_KEYS
    predictions = logits_by_hand(compressed_bundle, frame)[:, 0]
    assert metrics["pearson"] == pytest.approx(
        stats.pearsonr(predictions, frame["label"]).statistic, rel=1e-3
    )
    assert metrics["spearman"] == pytest.approx(
        stats.spearmanr(predictions, frame["label"]).statistic, rel=1e-3
    )


def test_latency_is_a_positive_median_per_model(tiny_bundle):
    timings = measure_latency_ms(
        {"a": tiny_bundle.model, "b": tiny_bundle.model},
        50,
        batch_size=2,
        sequence_length=8,
        repeats=3,
    )
    assert set(timings) == {"a", "b"} and all(value > 0 for value in timings.values())


def test_bad_evaluation_parameters_are_rejected(tiny_bundle):
    with pytest.raises(ValueError, match="latency"):
        evaluate_dense(
            tiny_bundle,
            TEST_SPLIT,
            {"max_length": 8},
            {"batch_size": 4},
            {"targets": None},
            REFINEMENT_OFF,
        )
    bad = {**EVALUATION, "latency": {**EVALUATION["latency"], "repeats": 0}}
    with pytest.raises(ValueError, match="repeats"):
        evaluate_dense(
            tiny_bundle, TEST_SPLIT, {"max_length": 8}, bad, {"targets": None}, REFINEMENT_OFF
        )
