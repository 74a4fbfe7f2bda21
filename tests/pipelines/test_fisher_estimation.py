"""fisher_estimation pipeline on a tiny random BERT, run from an in-memory catalog."""

from __future__ import annotations

import json

import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import make_tiny_bundle, varied_split
from weighted_lowrank.lowrank.batching import make_batches
from weighted_lowrank.lowrank.fisher import empirical_fisher, model_fingerprint
from weighted_lowrank.pipelines.fisher_estimation import create_pipeline
from weighted_lowrank.pipelines.fisher_estimation.nodes import select_fisher_examples


def run_pipeline(bundle, split, fisher_estimation) -> DataCatalog:
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(bundle, copy_mode="assign"),
            "train_split": MemoryDataset(split),
            "params:fisher_estimation": MemoryDataset(fisher_estimation),
            "params:model": MemoryDataset({"source": "unused", "max_length": 16}),
            "params:seed": MemoryDataset(3),
            "params:device": MemoryDataset("cpu"),
            "fisher_information": MemoryDataset(copy_mode="assign"),
            "fisher_estimation_metrics": MemoryDataset(),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


@pytest.mark.parametrize("mode", ["per_example", "minibatch"])
def test_pipeline_writes_the_fisher_of_the_sampled_examples_with_metadata(mode) -> None:
    bundle = make_tiny_bundle()
    split = varied_split(40, seed=0)
    params = {"num_examples": 24, "mode": mode, "targets": None, "batch_size": 8, "progress": False}
    catalog = run_pipeline(bundle, split, params)
    output = catalog.load("fisher_information")
    metrics = catalog.load("fisher_estimation_metrics")

    examples = split.sample(n=24, random_state=3)
    expected = empirical_fisher(
        bundle.model,
        make_batches(examples, bundle.tokenizer, batch_size=8, max_length=16),
        mode=mode,
    )
    assert output["tensors"].keys() == expected.keys() and len(expected) == 12
    for key, tensor in expected.items():
        torch.testing.assert_close(output["tensors"][key], tensor, rtol=1e-5, atol=0)
    metadata = output["metadata"]
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["mode"] == mode and metadata["num_examples"] == "24"
    assert metadata["model_fingerprint"] == model_fingerprint(bundle.model)
    assert json.loads(metadata["targets"]) is None and metadata["batch_size"] == "8"
    assert metrics["num_examples"] == {"value": 24.0, "step": 0}
    assert metrics["seconds"]["value"] > 0 and metrics["seconds"]["step"] == 0


def test_targets_parameter_limits_the_tensors() -> None:
    bundle = make_tiny_bundle()
    params = {
        "num_examples": None,
        "targets": ["bert.encoder.layer.1.intermediate.dense"],
        "progress": False,
    }
    catalog = run_pipeline(bundle, varied_split(10, seed=1), params)
    output = catalog.load("fisher_information")
    assert list(output["tensors"]) == ["bert.encoder.layer.1.intermediate.dense.weight"]
    assert output["tensors"]["bert.encoder.layer.1.intermediate.dense.weight"].shape == (128, 32)
    assert output["metadata"]["num_examples"] == "10"


def test_select_fisher_examples_is_seeded_and_capped() -> None:
    split = varied_split(30, seed=2)
    first = select_fisher_examples(split, {"num_examples": 10}, seed=5)
    assert first.equals(select_fisher_examples(split, {"num_examples": 10}, seed=5))
    assert not first.equals(select_fisher_examples(split, {"num_examples": 10}, seed=6))
    assert len(select_fisher_examples(split, {"num_examples": 100}, seed=5)) == 30
    with pytest.raises(ValueError, match="num_examples"):
        select_fisher_examples(split, {"num_examples": 0}, seed=5)
    with pytest.raises(ValueError, match="lacks columns"):
        select_fisher_examples(split.drop(columns="label"), {"num_examples": 5}, seed=5)


def test_bad_mode_is_rejected_before_work() -> None:
    bundle = make_tiny_bundle()
    with pytest.raises(Exception, match="fisher_estimation.mode 'exact'"):
        run_pipeline(bundle, varied_split(8, seed=0), {"mode": "exact", "progress": False})
