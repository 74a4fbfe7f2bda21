"""The refinement pipeline: fine-tuning after compression on a tiny random BERT."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from tests.conftest import make_tiny_bundle, toy_split
from weighted_lowrank.datasets import HFModelDataset
from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.hooks import EarlyParameterChecks
from weighted_lowrank.lowrank.fisher import model_fingerprint
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.lowrank.surgery import compress_model, load_compressed, lowrank_modules
from weighted_lowrank.pipelines.evaluation import create_pipeline as create_evaluation
from weighted_lowrank.pipelines.evaluation.nodes import evaluate_compressed, score_split
from weighted_lowrank.pipelines.refinement import create_pipeline as create_refinement
from weighted_lowrank.pipelines.refinement.nodes import check_refinement, refine
from weighted_lowrank.training import TrainingOptions, train_classifier

MODEL = {"source": "unused", "max_length": 16}
EVALUATION = {
    "batch_size": 16,
    "device": "cpu",
    "latency": {"batch_size": 2, "sequence_length": 8, "repeats": 2, "warmup": 1, "threads": None},
}
REFINEMENT = {
    "enabled": True,
    "trainable": "all",
    "epochs": 2,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.0,
    "progress": False,
}
TRAIN, VALIDATION, TEST = toy_split(96, seed=0), toy_split(32, seed=1), toy_split(48, seed=2)


@pytest.fixture(scope="module")
def compressed() -> tuple[ModelBundle, ModelBundle, list[dict]]:
    """A tiny BERT fine-tuned on the toy task (a random one learns nothing once compressed)."""
    dense = make_tiny_bundle(seed=1)
    options = TrainingOptions(
        epochs=3, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, max_length=16
    )
    train_classifier(
        dense.model, dense.tokenizer, toy_split(256, seed=3), VALIDATION, options, progress=False
    )
    model, report = compress_model(copy.deepcopy(dense.model), None, 0.3, "svd")
    return dense, ModelBundle(model=model, tokenizer=dense.tokenizer), report


def fresh(bundle: ModelBundle) -> ModelBundle:
    return ModelBundle(model=copy.deepcopy(bundle.model), tokenizer=bundle.tokenizer)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_disabled_refinement_hands_the_model_through_untouched(compressed):
    _, bundle, _ = compressed
    before = state(bundle.model)
    refined, record = refine(bundle, TRAIN, VALIDATION, MODEL, {"enabled": False}, 0, "cpu")
    assert refined is bundle
    assert record == {
        "enabled": False,
        "trainable": "all",
        "compressed_model_fingerprint": model_fingerprint(bundle.model),
        "epochs": [],
    }
    assert all(torch.equal(before[key], value) for key, value in state(bundle.model).items())


def test_refinement_is_the_fine_tuning_loop_with_the_same_options(compressed):
    _, bundle, _ = compressed
    refined, record = refine(fresh(bundle), TRAIN, VALIDATION, MODEL, REFINEMENT, 7, "cpu")
    reference = fresh(bundle)
    options = TrainingOptions(
        epochs=2, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0, max_length=16, seed=7
    )
    history = train_classifier(
        reference.model, reference.tokenizer, TRAIN, VALIDATION, options, progress=False
    )
    expected = state(reference.model)
    assert all(torch.equal(expected[key], value) for key, value in state(refined.model).items())
    assert [epoch["train_loss"] for epoch in record["epochs"]] == [
        epoch["train_loss"] for epoch in history
    ]
    assert record["epochs"][-1]["train_loss"] < record["epochs"][0]["train_loss"]
    assert record["options"]["seed"] == 7 and record["trainable"] == "all"


def test_factors_only_trains_the_low_rank_layers_and_unfreezes_afterwards(compressed):
    _, bundle, _ = compressed
    before = state(bundle.model)
    refined, _ = refine(
        fresh(bundle), TRAIN, VALIDATION, MODEL, {**REFINEMENT, "trainable": "factors"}, 0, "cpu"
    )
    prefixes = tuple(f"{name}." for name in lowrank_modules(refined.model))
    after = state(refined.model)
    changed = {key for key in after if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith(prefixes) for key in changed)
    assert any(key.endswith("left.weight") for key in changed)
    assert any(key.endswith("right.weight") for key in changed)
    assert all(parameter.requires_grad for parameter in refined.model.parameters())


def test_a_saved_refined_model_reloads_with_load_compressed(compressed, tmp_path):
    _, bundle, _ = compressed
    refined, _ = refine(fresh(bundle), TRAIN, VALIDATION, MODEL, REFINEMENT, 0, "cpu")
    HFModelDataset(str(tmp_path / "refined"), compressed=True).save(refined)
    reloaded = load_compressed(tmp_path / "refined")
    batch = refined.tokenizer(list(TEST["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = refined.model.eval()(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected)


def test_evaluation_reports_refined_metrics_beside_the_compressed_ones(compressed):
    dense, bundle, report = compressed
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(dense, copy_mode="assign"),
            "train_split": MemoryDataset(TRAIN),
            "validation_split": MemoryDataset(VALIDATION),
            "test_split": MemoryDataset(TEST),
            "params:model": MemoryDataset(MODEL),
            "params:evaluation": MemoryDataset(EVALUATION),
            "params:compression": MemoryDataset({"budget": 0.3, "targets": None}),
            "params:refinement": MemoryDataset(REFINEMENT),
            "params:seed": MemoryDataset(0),
            "params:device": MemoryDataset("cpu"),
        }
    )
    for solver in SOLVERS:
        catalog[f"{solver}.compressed_model"] = MemoryDataset(fresh(bundle), copy_mode="assign")
        catalog[f"{solver}.layer_report"] = MemoryDataset(pd.DataFrame(report))
    SequentialRunner().run(create_refinement().only_nodes_with_tags("svd"), catalog)
    refined, history = catalog.load("svd.refined_model"), catalog.load("svd.refinement_history")
    evaluation = create_evaluation().only_nodes("dense.evaluate", "svd.evaluate")
    SequentialRunner().run(evaluation, catalog)
    dense_metrics = catalog.load("dense.evaluation_metrics")
    metrics = catalog.load("svd.evaluation_metrics")
    assert set(metrics) == set(dense_metrics)
    by_hand = score_split(refined, TEST, 16, EVALUATION)
    for key, value in by_hand.items():
        assert metrics[f"{key}_refined"] == pytest.approx(value)
    unrefined = score_split(bundle, TEST, 16, EVALUATION)
    assert metrics["test_loss"] == pytest.approx(unrefined["test_loss"])
    assert metrics["test_loss_refined"] < metrics["test_loss"]
    assert metrics["refinement_seconds"] == history["epochs"][-1]["seconds"] > 0
    assert dense_metrics["accuracy_refined"] == dense_metrics["accuracy"]
    assert dense_metrics["refinement_seconds"] == 0.0
    assert np.isfinite(list(metrics.values())).all()


def test_enabled_refinement_needs_a_refined_model_of_the_same_run(compressed):
    dense, bundle, report = compressed
    frame = pd.DataFrame(report)
    arguments = (bundle, dense, frame, TEST, MODEL, EVALUATION)
    fingerprint = model_fingerprint(bundle.model)
    not_refined = {"enabled": False, "compressed_model_fingerprint": fingerprint, "epochs": []}
    with pytest.raises(ValueError, match="records no training"):
        evaluate_compressed(*arguments, bundle, not_refined, REFINEMENT)
    trained = {**not_refined, "enabled": True, "epochs": [{"seconds": 1.0}]}
    other, _ = compress_model(copy.deepcopy(dense.model), None, 0.2, "svd")
    with pytest.raises(ValueError, match="refined_model's low-rank modules and ranks"):
        evaluate_compressed(*arguments, ModelBundle(other, dense.tokenizer), trained, REFINEMENT)
    from_elsewhere = {**trained, "compressed_model_fingerprint": "0" * 16}
    with pytest.raises(ValueError, match="another compressed_model"):
        evaluate_compressed(*arguments, bundle, from_elsewhere, REFINEMENT)
    metrics = evaluate_compressed(*arguments, bundle, trained, REFINEMENT)
    assert metrics["accuracy_refined"] == metrics["accuracy"]  # the same weights, scored twice


@pytest.mark.parametrize(
    ("refinement", "message"),
    [
        ({"enabled": "yes"}, "refinement.enabled"),
        ({"enabled": True, "trainable": "head"}, "refinement.trainable"),
        ({"enabled": True, "epoch": 1}, "unknown keys \\['epoch'\\]"),
        ({"enabled": True, "learning_rate": 0}, "learning_rate"),
    ],
)
def test_bad_refinement_parameters_are_named(refinement, message):
    with pytest.raises(ValueError, match=message):
        check_refinement(refinement, 16, 0)


def test_the_hook_checks_refinement_before_the_run_starts():
    catalog = DataCatalog(
        {
            "params:refinement": MemoryDataset({"enabled": True, "trainable": "head"}),
            "params:model": MemoryDataset(MODEL),
            "params:seed": MemoryDataset(0),
        }
    )
    with pytest.raises(ValueError, match="refinement.trainable"):
        EarlyParameterChecks().before_pipeline_run({}, create_refinement(), catalog)
    EarlyParameterChecks().before_pipeline_run({}, Pipeline([]), catalog)  # not consumed
