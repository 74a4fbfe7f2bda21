"""fisher_estimation pipeline on a tiny random BERT, run from an in-memory catalog."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import block_values, make_tiny_bundle, toy_split, typed_params, varied_split
from weighted_lowrank.hf.batching import make_batches
from weighted_lowrank.kedro_glue.lineage import fingerprint_of
from weighted_lowrank.kedro_glue.parameters import FisherParams, ParameterError
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.fisher import empirical_fisher
from weighted_lowrank.pipelines.fine_tuning.nodes import fine_tune
from weighted_lowrank.pipelines.fisher_estimation import create_pipeline
from weighted_lowrank.pipelines.fisher_estimation.nodes import (
    estimate_fisher,
    select_fisher_examples,
)

MODEL = typed_params("model", source="unused", max_length=16)


def fisher_params(**overrides) -> FisherParams:
    return typed_params("fisher_estimation", **{"progress": False, **overrides})


def run_pipeline(bundle, split, fisher_estimation: FisherParams) -> DataCatalog:
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(bundle, copy_mode="assign"),
            "train_split": MemoryDataset(split),
            # Typed, as the TypedParameters hook hands them to the nodes in a run.
            "params:fisher_estimation": MemoryDataset(fisher_estimation),
            "params:model": MemoryDataset(MODEL),
            "params:seed": MemoryDataset(3),
            "params:device": MemoryDataset("cpu"),
            "fisher_information": MemoryDataset(copy_mode="assign"),
            "calibration_statistics": MemoryDataset(copy_mode="assign"),
            "fisher_estimation_metrics": MemoryDataset(),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


@pytest.mark.parametrize("mode", ["per_example", "minibatch"])
def test_pipeline_writes_the_fisher_of_the_sampled_examples_with_metadata(mode) -> None:
    bundle = make_tiny_bundle()
    split = varied_split(40, seed=0)
    params = fisher_params(num_examples=24, mode=mode, targets=None, batch_size=8)
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
    assert fingerprint_of(output) == model_fingerprint(bundle.model)
    assert json.loads(metadata["targets"]) is None and metadata["batch_size"] == "8"
    assert metrics["num_examples"] == {"value": 24.0, "step": 0}
    assert metrics["seconds"]["value"] > 0 and metrics["seconds"]["step"] == 0


def test_targets_parameter_limits_the_tensors() -> None:
    bundle = make_tiny_bundle()
    params = fisher_params(num_examples=None, targets=["bert.encoder.layer.1.intermediate.dense"])
    catalog = run_pipeline(bundle, varied_split(10, seed=1), params)
    output = catalog.load("fisher_information")
    assert list(output["tensors"]) == ["bert.encoder.layer.1.intermediate.dense.weight"]
    assert output["tensors"]["bert.encoder.layer.1.intermediate.dense.weight"].shape == (128, 32)
    assert output["metadata"]["num_examples"] == "10"
    assert json.loads(output["metadata"]["targets"]) == ["bert.encoder.layer.1.intermediate.dense"]


def test_select_fisher_examples_is_seeded_and_capped() -> None:
    split = varied_split(30, seed=2)
    ten = fisher_params(num_examples=10)
    first = select_fisher_examples(split, ten, seed=5)
    pd.testing.assert_frame_equal(first, split.sample(n=10, random_state=5).reset_index(drop=True))
    assert not first.equals(select_fisher_examples(split, ten, seed=6))
    everything = select_fisher_examples(split, fisher_params(num_examples=100), seed=5)
    pd.testing.assert_frame_equal(everything, split)
    unset = select_fisher_examples(split, fisher_params(num_examples=None), seed=5)
    pd.testing.assert_frame_equal(unset, split)


def test_the_fisher_carries_the_fingerprint_of_the_fine_tuned_model() -> None:
    """Lineage: the fingerprint fine_tune gives its bundle is the one the Fisher records."""
    base = make_tiny_bundle(seed=2)
    fine_tuning = typed_params("fine_tuning", epochs=1, batch_size=8, progress=False)
    tuned, _ = fine_tune(
        base, toy_split(16, seed=0), toy_split(8, seed=1), MODEL, fine_tuning, 0, "cpu"
    )
    split = varied_split(8, seed=3)
    fisher, _, _ = estimate_fisher(tuned, split, fisher_params(batch_size=4), MODEL, "cpu")
    assert fisher["metadata"]["model_fingerprint"] == tuned.model_fingerprint
    assert fingerprint_of(fisher) == fingerprint_of(tuned) == model_fingerprint(tuned.model)
    assert set(fisher["metadata"]) == {
        "mode",
        "num_examples",
        "targets",
        "batch_size",
        "max_length",
        "seconds",
        "model_fingerprint",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "exact"}, r"fisher_estimation\.mode='exact': expected one of \['per_example'"),
        (
            {"num_examples": 0},
            r"fisher_estimation\.num_examples=0: expected a positive int or null",
        ),
        ({"batch_size": 0}, r"fisher_estimation\.batch_size=0: expected a positive int"),
        ({"targets": 5}, r"fisher_estimation\.targets=5: expected null, a regex"),
        ({"progress": 1}, r"fisher_estimation\.progress=1: expected true or false"),
    ],
)
def test_the_fisher_block_rejects_bad_values_naming_the_key(overrides, message) -> None:
    with pytest.raises(ParameterError, match=message):
        FisherParams.model_validate(block_values("fisher_estimation", **overrides))
