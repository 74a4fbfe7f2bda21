"""The evaluation pipeline on a tiny random BERT: metrics recomputed by hand, same keys everywhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from safetensors.torch import load_file
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tests.conftest import TOY_NEGATIVE, TOY_POSITIVE, make_tiny_bundle, typed_params
from tests.pipelines.conftest import BUDGET
from weighted_lowrank.hf import latency
from weighted_lowrank.hf.latency import measure_latency_ms
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY, fingerprint_of, with_fingerprint
from weighted_lowrank.lowrank.compression import compress_model
from weighted_lowrank.lowrank.serialization import WEIGHTS_FILE, save_compressed
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.evaluation import create_pipeline as create_evaluation
from weighted_lowrank.pipelines.evaluation.nodes import (
    PREDICTION_COLUMNS,
    evaluate_compressed,
    evaluate_dense,
)
from weighted_lowrank.pipelines.evaluation.pipeline import create_compressed_evaluation

MAX_LENGTH = 16
FINGERPRINT = "00ff00ff00ff00ff"
MODEL = typed_params("model", max_length=MAX_LENGTH)
EVALUATION = typed_params(
    "evaluation",
    batch_size=4,
    device="cpu",
    latency={
        "batch_size": 2,
        "sequence_length": 8,
        "repeats": 3,
        "warmup": 1,
        "threads": None,
        "seed": 0,
    },
)
COMPRESSION = typed_params("compression", budget=BUDGET, device="cpu", seed=0)
TEST_SPLIT = pd.DataFrame(
    {
        "text": TOY_POSITIVE
        + TOY_NEGATIVE
        + ["fine plot", "dull plot", "great movie", "awful film"],
        "label": [1, 1, 1, 0, 0, 0, 1, 0, 1, 0],
    }
)
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
    "predicted_loss_increase",
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


def fake_report(results) -> pd.DataFrame:
    """The columns of a layer report that evaluation reads (plain SVD: its own reference)."""
    return pd.DataFrame(
        {
            "module": list(results),
            "rank": [result.rank for result in results.values()],
            "weighted_loss": [float(result.loss) for result in results.values()],
            "svd_loss": [float(result.loss) for result in results.values()],
            "total_seconds": 0.25,
        }
    )


def fake_rank_map(results) -> pd.DataFrame:
    """The columns of a rank map that evaluation reads: every factorized layer, none dense."""
    return pd.DataFrame(
        {
            "module": list(results),
            "rank": [result.rank for result in results.values()],
            "dense": False,
            "predicted_loss": 0.125,
        }
    )


@pytest.fixture(scope="module")
def evaluated(factorized):
    """The evaluation pipeline on the factorized models, all stamped with one lineage."""
    bundle, _, factorization = factorized
    dense = with_fingerprint(bundle, FINGERPRINT)
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(dense),
            "test_split": MemoryDataset(TEST_SPLIT),
            "params:model": MemoryDataset(MODEL),
            "params:evaluation": MemoryDataset(EVALUATION),
            "params:compression": MemoryDataset(COMPRESSION),
        }
    )
    for solver in SOLVERS:
        compressed = factorization.load(f"{solver}.compressed_model")
        catalog[f"{solver}.compressed_model"] = with_fingerprint(compressed, FINGERPRINT)
        catalog[f"{solver}.layer_report"] = factorization.load(f"{solver}.layer_report")
        catalog[f"{solver}.rank_map"] = factorization.load(f"{solver}.rank_map")
    SequentialRunner().run(create_evaluation(), catalog)
    return dense, catalog


def test_namespaces_for_dense_and_every_solver():
    pipeline = create_evaluation()
    assert {node.name for node in pipeline.nodes} == {
        f"{name}.evaluate" for name in ("dense", *SOLVERS)
    }
    assert pipeline.outputs() == {
        f"{name}.{output}"
        for name in ("dense", *SOLVERS)
        for output in ("evaluation_metrics", "predictions")
    }
    assert pipeline.inputs() == {
        "fine_tuned_model",
        "test_split",
        "params:model",
        "params:evaluation",
        "params:compression",
        *(
            f"{solver}.{name}"
            for solver in SOLVERS
            for name in ("compressed_model", "layer_report", "rank_map")
        ),
    }


def test_a_refined_row_is_the_solver_template_with_its_solver_report():
    pipeline = create_compressed_evaluation("refined.svd", "svd")
    (node,) = pipeline.nodes
    assert node.name == "refined.svd.evaluate" and node.func is evaluate_compressed
    assert node.inputs == [
        "refined.svd.compressed_model",
        "fine_tuned_model",
        "svd.layer_report",
        "svd.rank_map",
        "test_split",
        "params:model",
        "params:evaluation",
    ]
    assert node.outputs == ["refined.svd.evaluation_metrics", "refined.svd.predictions"]


def test_every_namespace_reports_a_stamped_record_with_the_same_flat_float_keys(evaluated):
    _, catalog = evaluated
    for name in ("dense", *SOLVERS):
        record = catalog.load(f"{name}.evaluation_metrics")
        assert set(record) == {FINGERPRINT_KEY, "metrics"}, name
        assert fingerprint_of(record) == FINGERPRINT, name
        metrics = record["metrics"]
        assert set(metrics) == CLASSIFICATION_KEYS | COMMON_KEYS, name
        assert all(isinstance(value, float) and np.isfinite(value) for value in metrics.values()), (
            name
        )


def test_svd_metrics_match_a_recomputation_by_hand(evaluated, tmp_path):
    _, catalog = evaluated
    compressed = catalog.load("svd.compressed_model")
    report = catalog.load("svd.layer_report")
    metrics = catalog.load("svd.evaluation_metrics")["metrics"]
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
    dense = catalog.load("dense.evaluation_metrics")["metrics"]
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
        metrics = catalog.load(f"{solver}.evaluation_metrics")["metrics"]
        saved_layers = dense["params_kept"] - metrics["params_kept"]
        assert metrics["params_model"] == dense["params_model"] - saved_layers, solver
        assert metrics["params_ratio_layers"] == pytest.approx(
            metrics["params_kept"] / dense["params_kept"]
        )
        assert metrics["params_ratio_model"] == pytest.approx(
            metrics["params_model"] / dense["params_model"]
        )
        assert metrics["size_on_disk_bytes"] < dense["size_on_disk_bytes"], solver


def test_latency_is_timed_once_per_model_shape_with_the_latency_block(monkeypatch):
    """Dense once; a compressed shape once (a second model of that shape reuses its median, a
    new shape is timed); the options are the ``evaluation.latency`` block as it is."""
    bundle = make_tiny_bundle(seed=2)
    compressed, results = compress_model(bundle.model, None, 0.5, "svd")
    other, _ = compress_model(bundle.model, None, 0.5, "fwsvd")  # same shape, other values
    smaller, smaller_results = compress_model(bundle.model, None, 0.25, "svd")
    calls = []

    def fake_latency(models, vocab_size, **options):
        calls.append((list(models), vocab_size, options))
        return {name: 2.0 if name == "dense" else 1.0 for name in models}

    monkeypatch.setattr(latency, "measure_latency_ms", fake_latency)
    monkeypatch.setattr(latency, "_MEASURED", {})
    dense = evaluate_dense(bundle, TEST_SPLIT, MODEL, EVALUATION, COMPRESSION)[0]["metrics"]
    rows = [
        evaluate_compressed(
            type(bundle)(model=model, tokenizer=bundle.tokenizer),
            bundle,
            fake_report(found),
            fake_rank_map(found),
            TEST_SPLIT,
            MODEL,
            EVALUATION,
        )[0]["metrics"]
        for model, found in ((compressed, results), (other, results), (smaller, smaller_results))
    ]
    metrics = rows[0]
    vocab = bundle.model.config.vocab_size
    latency_block = EVALUATION.latency.model_dump()
    assert calls == [
        (["dense"], vocab, latency_block),
        (["compressed"], vocab, latency_block),
        (["compressed"], vocab, latency_block),  # the smaller shape; `other` reused the first
    ]
    assert (dense["latency_ms"], dense["latency_dense_ms"]) == (2.0, 2.0)
    for row in rows:
        assert (row["latency_ms"], row["latency_dense_ms"], row["latency_ratio"]) == (
            1.0,
            2.0,
            0.5,
        )
    assert metrics["factorization_seconds"] == 0.25
    assert metrics["predicted_loss_increase"] == pytest.approx(0.125 * len(results))


def test_regression_reports_pearson_and_spearman():
    bundle = make_tiny_bundle(num_labels=1, seed=5)
    frame = TEST_SPLIT.assign(label=np.linspace(0.0, 5.0, len(TEST_SPLIT)))
    compressed, results = compress_model(bundle.model, None, 0.5, "svd")
    compressed_bundle = type(bundle)(model=compressed, tokenizer=bundle.tokenizer)
    dense, dense_predictions = evaluate_dense(bundle, frame, MODEL, EVALUATION, COMPRESSION)
    record, predictions = evaluate_compressed(
        compressed_bundle,
        bundle,
        fake_report(results),
        fake_rank_map(results),
        frame,
        MODEL,
        EVALUATION,
    )
    # Models without a lineage give records without one (nothing to check them against).
    assert set(dense) == set(record) == {"metrics"}
    assert list(predictions.columns) == list(dense_predictions.columns) == list(PREDICTION_COLUMNS)
    metrics = record["metrics"]
    assert set(dense["metrics"]) == set(metrics) == {"pearson", "spearman"} | COMMON_KEYS
    by_hand = logits_by_hand(compressed_bundle, frame)[:, 0]
    assert metrics["pearson"] == pytest.approx(
        stats.pearsonr(by_hand, frame["label"]).statistic, rel=1e-3
    )
    assert metrics["spearman"] == pytest.approx(
        stats.spearmanr(by_hand, frame["label"]).statistic, rel=1e-3
    )
    # A regression prediction is the predicted value, its loss the squared error.
    assert predictions["prediction"].dtype == np.float64
    np.testing.assert_allclose(predictions["prediction"], by_hand, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        predictions["loss"], (predictions["prediction"] - frame["label"]) ** 2, rtol=1e-5
    )
    assert predictions["loss"].mean() == pytest.approx(metrics["test_loss"], rel=1e-5)


def test_every_namespace_predicts_the_same_examples_stamped_with_its_lineage(evaluated):
    _, catalog = evaluated
    labels = TEST_SPLIT["label"].to_numpy()
    for name in ("dense", *SOLVERS):
        predictions = catalog.load(f"{name}.predictions")
        logits = [f"logit_{k}" for k in range(2)]  # the tiny model's two classes
        assert list(predictions.columns) == [*PREDICTION_COLUMNS, *logits, FINGERPRINT_KEY], name
        assert fingerprint_of(predictions) == FINGERPRINT, name
        # id is the position in test_split, the same in every row.
        np.testing.assert_array_equal(predictions["id"], np.arange(len(TEST_SPLIT)))
        np.testing.assert_array_equal(predictions["label"], labels)
        assert predictions["prediction"].dtype == np.int64, name
        metrics = catalog.load(f"{name}.evaluation_metrics")["metrics"]
        accuracy = float((predictions["prediction"] == predictions["label"]).mean())
        assert accuracy == metrics["accuracy"], name
        assert predictions["loss"].mean() == pytest.approx(metrics["test_loss"], rel=1e-5), name


def test_per_example_loss_is_the_cross_entropy_of_each_example(evaluated):
    _, catalog = evaluated
    compressed = catalog.load("tfwsvd.compressed_model")
    predictions = catalog.load("tfwsvd.predictions")
    logits = torch.from_numpy(logits_by_hand(compressed, TEST_SPLIT))
    labels = torch.tensor(TEST_SPLIT["label"].to_numpy())
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    np.testing.assert_allclose(predictions["loss"], cross_entropy.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(predictions["prediction"], logits.argmax(dim=1).numpy())


def test_latency_is_a_positive_median_per_model(tiny_bundle):
    timings = measure_latency_ms(
        {"a": tiny_bundle.model, "b": tiny_bundle.model},
        50,
        batch_size=2,
        sequence_length=8,
        repeats=3,
    )
    assert set(timings) == {"a", "b"} and all(value > 0 for value in timings.values())
