"""Fine-tuning loop: learns a separable toy task; option and split validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import make_tiny_bundle, toy_split, typed_params
from weighted_lowrank.hf.batching import encode_examples, pad_examples
from weighted_lowrank.hf.training import (
    TrainingOptions,
    evaluate_classifier,
    predict_examples,
    task_metrics,
    train_classifier,
)
from weighted_lowrank.kedro_glue.parameters import ParameterError


def test_fine_tuning_learns_a_separable_task() -> None:
    bundle = make_tiny_bundle(seed=1)
    train, validation = toy_split(256, seed=0), toy_split(128, seed=1)
    before = evaluate_classifier(bundle.model, bundle.tokenizer, validation, max_length=16)
    options = TrainingOptions(epochs=4, batch_size=16, learning_rate=2e-3, max_length=16, seed=3)
    history = train_classifier(
        bundle.model, bundle.tokenizer, train, validation, options, progress=False
    )
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    assert history[-1]["val_accuracy"] >= 0.9 > before["accuracy"] + 0.2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(np.diff([record["seconds"] for record in history]) > 0)
    assert not bundle.model.training


def test_training_is_deterministic_for_a_seed() -> None:
    train, validation = toy_split(64, seed=0), toy_split(32, seed=1)
    options = TrainingOptions(epochs=1, batch_size=16, learning_rate=1e-3, max_length=16, seed=5)
    weights = []
    for _ in range(2):
        bundle = make_tiny_bundle(seed=1)
        train_classifier(bundle.model, bundle.tokenizer, train, validation, options, progress=False)
        weights.append(bundle.model.classifier.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_predict_keeps_row_order_despite_length_sorting() -> None:
    bundle = make_tiny_bundle()
    frame = pd.DataFrame(
        {"text": ["good", "a terrible dull movie and bad plot", "fine film"], "label": [1, 0, 1]}
    )
    logits = predict_examples(bundle.model, bundle.tokenizer, frame, max_length=16).logits
    for row in range(len(frame)):
        single = predict_examples(bundle.model, bundle.tokenizer, frame.iloc[[row]], 16).logits
        np.testing.assert_allclose(logits[row], single[0], atol=1e-5)


def test_collate_pads_and_pairs_get_segment_ids() -> None:
    bundle = make_tiny_bundle()
    frame = pd.DataFrame(
        {"text": ["good", "a dull movie"], "text_pair": ["bad plot", "fine"], "label": [0, 1]}
    )
    examples = encode_examples(frame, bundle.tokenizer, max_length=16)
    batch = pad_examples(examples, bundle.tokenizer.pad_token_id)
    lengths = [example["input_ids"].numel() for example in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert set(batch["token_type_ids"][0, : lengths[0]].tolist()) == {0, 1}
    assert batch["labels"].tolist() == [0, 1]


def test_task_metrics_classification_and_regression() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    scores = task_metrics(logits, np.array([0, 1, 0, 0]))
    assert scores["accuracy"] == pytest.approx(0.75)
    assert -1 <= scores["mcc"] <= 1 and 0 <= scores["f1"] <= 1
    regression = task_metrics(np.array([[0.1], [0.5], [0.9]]), np.array([1.0, 2.0, 3.0]))
    assert regression["pearson"] == pytest.approx(1.0) and regression["spearman"] == pytest.approx(
        1.0
    )


@pytest.mark.parametrize(
    ("block", "field", "value"),
    [
        ("fine_tuning", "epochs", 0),
        ("fine_tuning", "batch_size", -1),
        ("fine_tuning", "learning_rate", 0.0),
        ("fine_tuning", "warmup_ratio", 1.0),
        ("model", "max_length", 2.5),
        ("refinement", "eval_batch_size", 0),
    ],
)
def test_bad_training_options_are_refused_by_their_parameter_block(
    block: str, field: str, value: object
) -> None:
    # TrainingOptions are built from these checked blocks (TrainingLoopParams.training_options).
    with pytest.raises(ParameterError, match=rf"{block}\.{field}={value}"):
        typed_params(block, **{field: value})


def test_split_without_label_column_raises() -> None:
    bundle = make_tiny_bundle()
    with pytest.raises(ValueError, match="lacks columns \\['label'\\]"):
        train_classifier(
            bundle.model,
            bundle.tokenizer,
            pd.DataFrame({"text": ["a"]}),
            toy_split(4, 0),
            TrainingOptions(epochs=1),
            progress=False,
        )


def test_training_batches_cover_every_example_once_per_epoch_nearly_unpadded() -> None:
    """Each epoch is a seeded permutation of the examples cut into length-bucketed batches:
    every example once, the same batches for the same (seed, epoch), other batches for another
    epoch, and far fewer padded tokens than batches of random examples."""
    from tests.conftest import varied_split
    from weighted_lowrank.hf.training import iterate_batches

    tokenizer = make_tiny_bundle().tokenizer
    examples = encode_examples(varied_split(400, seed=3), tokenizer, 32)
    pad = tokenizer.pad_token_id

    def epoch(seed: int, number: int) -> list[dict[str, torch.Tensor]]:
        return list(iterate_batches(examples, 16, pad, seed, number))

    first = epoch(7, 0)
    seen = sorted(
        tuple(row[mask.bool()].tolist())
        for batch in first
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    )
    assert seen == sorted(tuple(example["input_ids"].tolist()) for example in examples)
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, epoch(7, 0), strict=True)
    )
    assert not all(
        a["input_ids"].shape == b["input_ids"].shape and torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(first, epoch(7, 1), strict=True)
    )
    real = sum(int(batch["attention_mask"].sum()) for batch in first)
    padded = sum(batch["attention_mask"].numel() for batch in first)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(examples))
    random_padded = sum(
        max(examples[i]["input_ids"].numel() for i in order[s : s + 16]) * len(order[s : s + 16])
        for s in range(0, len(order), 16)
    )
    assert padded / real < 1.1 < random_padded / real
