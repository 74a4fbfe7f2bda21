"""fine_tuning pipeline on a tiny random BERT saved to a local directory."""

from __future__ import annotations

import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import block_values, make_tiny_bundle, toy_split, typed_params
from weighted_lowrank.hf.training import TrainingOptions, train_classifier
from weighted_lowrank.kedro_glue.lineage import fingerprint_of
from weighted_lowrank.kedro_glue.parameters import FineTuningParams, ModelParams, ParameterError
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.pipelines.fine_tuning import create_pipeline
from weighted_lowrank.pipelines.fine_tuning.nodes import fine_tune, initialise_model

FAST = {"epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0, "progress": False}
ENABLED = typed_params("fine_tuning")


@pytest.fixture
def tiny_model_dir(tmp_path):
    bundle = make_tiny_bundle(num_labels=3)
    bundle.model.save_pretrained(tmp_path)
    bundle.tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def test_pipeline_fine_tunes_a_local_model_and_reports_each_epoch(tiny_model_dir) -> None:
    catalog = DataCatalog(
        {
            "label_names": MemoryDataset(["negative", "positive"]),
            "train_split": MemoryDataset(toy_split(256, seed=0)),
            "validation_split": MemoryDataset(toy_split(96, seed=1)),
            # Typed, as the TypedParameters hook hands them to the nodes in a run.
            "params:model": MemoryDataset(
                typed_params("model", source=tiny_model_dir, max_length=16)
            ),
            "params:fine_tuning": MemoryDataset(typed_params("fine_tuning", **FAST)),
            "params:seed": MemoryDataset(0),
            "params:device": MemoryDataset("auto"),
            "fine_tuned_model": MemoryDataset(copy_mode="assign"),
            "fine_tuning_metrics": MemoryDataset(),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    bundle, metrics = catalog.load("fine_tuned_model"), catalog.load("fine_tuning_metrics")
    # The saved head had 3 labels; the task's 2 labels replace it, with their names.
    assert bundle.model.config.num_labels == 2
    assert bundle.model.config.id2label == {0: "negative", 1: "positive"}
    assert [point["step"] for point in metrics["val_accuracy"]] == [1, 2, 3]
    assert metrics["val_accuracy"][-1]["value"] >= 0.85
    assert {"train_loss", "val_loss", "val_f1", "seconds"} <= set(metrics)
    # The fine-tuned model's lineage is the fingerprint of its own (trained) weights.
    assert fingerprint_of(bundle) == model_fingerprint(bundle.model)


def test_fine_tune_trains_as_the_loop_does_with_the_blocks_options(tiny_model_dir) -> None:
    """The node adds nothing to the loop: same options, same seed, same weights."""
    model = typed_params("model", source=tiny_model_dir, max_length=16)
    fine_tuning = typed_params("fine_tuning", **{**FAST, "epochs": 1})
    train, validation = toy_split(64, seed=0), toy_split(32, seed=1)
    base = initialise_model(model, ["a", "b"], ENABLED, seed=4)
    untrained = model_fingerprint(base.model)
    tuned, _ = fine_tune(base, train, validation, model, fine_tuning, 7, "cpu")

    reference = initialise_model(model, ["a", "b"], ENABLED, seed=4).model
    options = TrainingOptions(
        epochs=1, batch_size=8, learning_rate=3e-3, weight_decay=0.01, warmup_ratio=0.0,
        max_length=16, max_grad_norm=1.0, seed=7, eval_batch_size=128,
    )  # fmt: skip
    assert fine_tuning.training_options(16, 7) == options
    train_classifier(reference, base.tokenizer, train, validation, options, progress=False)
    for (name, value), expected in zip(
        tuned.model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert tuned.model_fingerprint == model_fingerprint(reference) != untrained


def test_regression_task_gets_a_single_output(tiny_model_dir) -> None:
    bundle = initialise_model(typed_params("model", source=tiny_model_dir), [], ENABLED, 0)
    assert bundle.model.config.num_labels == 1


def test_the_new_head_is_drawn_from_the_seed_alone(tiny_model_dir) -> None:
    model = typed_params("model", source=tiny_model_dir, max_length=16)
    heads = []
    for seed in (5, 5, 6):
        torch.manual_seed(len(heads))  # the caller's RNG state must not matter
        state = torch.random.get_rng_state()
        heads.append(
            initialise_model(model, ["a", "b"], ENABLED, seed).model.classifier.weight.detach()
        )
        assert torch.equal(torch.random.get_rng_state(), state)  # and is left as it was
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


def test_a_source_that_is_neither_a_directory_nor_a_hub_name_raises() -> None:
    model = typed_params("model", source="/no/such/dir/with/many/parts")
    with pytest.raises(ValueError, match="neither an existing local directory nor a hub name"):
        initialise_model(model, ["a", "b"], ENABLED, 0)


@pytest.mark.parametrize(
    ("block", "overrides", "message"),
    [
        (ModelParams, {"source": ""}, r"model\.source='': expected a non-empty string"),
        (ModelParams, {"source": None}, r"model\.source=None"),
        (ModelParams, {"max_length": 1}, r"model\.max_length=1: expected an int >= 2"),
        (FineTuningParams, {"epochs": 0}, r"fine_tuning\.epochs=0: expected a positive int"),
        (FineTuningParams, {"learning_rate": 0.0}, r"fine_tuning\.learning_rate=0\.0"),
        (FineTuningParams, {"warmup_ratio": 1.0}, r"fine_tuning\.warmup_ratio=1\.0"),
        (FineTuningParams, {"progress": "yes"}, r"fine_tuning\.progress='yes': expected true"),
        (FineTuningParams, {"lr": 1e-3}, r"fine_tuning has unknown keys \['lr'\]"),
    ],
)
def test_the_blocks_fine_tuning_reads_reject_bad_values_naming_the_key(
    block, overrides, message
) -> None:
    name = "model" if block is ModelParams else "fine_tuning"
    with pytest.raises(ParameterError, match=message):
        block.model_validate(block_values(name, **overrides))
