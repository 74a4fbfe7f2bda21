"""fine_tuning pipeline on a tiny random BERT saved to a local directory."""

from __future__ import annotations

import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import make_tiny_bundle, toy_split
from weighted_lowrank.pipelines.fine_tuning import create_pipeline
from weighted_lowrank.pipelines.fine_tuning.nodes import initialise_model


@pytest.fixture
def tiny_model_dir(tmp_path):
    bundle = make_tiny_bundle(num_labels=3)
    bundle.model.save_pretrained(tmp_path)
    bundle.tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def test_pipeline_fine_tunes_a_local_model_and_reports_each_epoch(tiny_model_dir) -> None:
    fine_tuning = {
        "epochs": 3,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.0,
        "progress": False,
    }
    catalog = DataCatalog(
        {
            "label_names": MemoryDataset(["negative", "positive"]),
            "train_split": MemoryDataset(toy_split(256, seed=0)),
            "validation_split": MemoryDataset(toy_split(96, seed=1)),
            "params:model": MemoryDataset({"source": tiny_model_dir, "max_length": 16}),
            "params:fine_tuning": MemoryDataset(fine_tuning),
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


def test_regression_task_gets_a_single_output(tiny_model_dir) -> None:
    bundle = initialise_model({"source": tiny_model_dir, "max_length": 16}, [], 0)
    assert bundle.model.config.num_labels == 1


def test_the_new_head_is_drawn_from_the_seed_alone(tiny_model_dir) -> None:
    model = {"source": tiny_model_dir, "max_length": 16}
    heads = []
    for seed in (5, 5, 6):
        torch.manual_seed(len(heads))  # the caller's RNG state must not matter
        state = torch.random.get_rng_state()
        heads.append(initialise_model(model, ["a", "b"], seed).model.classifier.weight.detach())
        assert torch.equal(torch.random.get_rng_state(), state)  # and is left as it was
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


@pytest.mark.parametrize("source", ["", None, "/no/such/dir/with/many/parts"])
def test_bad_model_source_raises(source) -> None:
    with pytest.raises(ValueError, match="model"):
        initialise_model({"source": source, "max_length": 16}, ["a", "b"], 0)
