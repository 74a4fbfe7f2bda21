"""Calibration statistics from the Fisher pass: A, G and |x| equal a per-token loop over examples
run alone, in both Fisher modes, with padding; sharing, subsets, the unchanged Fisher, the node's
output and the parameter check."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch.nn import functional

from tests.conftest import block_values, make_tiny_bundle, typed_params, varied_split
from tests.lowrank.test_fisher import LABELS, TEXTS
from weighted_lowrank.hf.batching import make_batches
from weighted_lowrank.kedro_glue.lineage import fingerprint_of
from weighted_lowrank.kedro_glue.parameters import FisherParams, ParameterError
from weighted_lowrank.lowrank import calibration
from weighted_lowrank.lowrank.calibration import (
    CALIBRATION_STATISTICS,
    StatisticsAccumulator,
    statistic_key,
)
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.fisher import calibrate, empirical_fisher
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.pipelines.fisher_estimation.nodes import estimate_fisher


def per_token_reference(model, modules, examples, loss_of):
    """A, G and |x| by Python loops over examples (each run alone, unpadded), modules, calls and
    tokens, in float64; also T (tokens) and N (examples)."""
    sums = {}
    for name, module in modules.items():
        sums[statistic_key(name, "input_moment")] = torch.zeros(
            module.in_features, module.in_features, dtype=torch.float64
        )
        sums[statistic_key(name, "output_moment")] = torch.zeros(
            module.out_features, module.out_features, dtype=torch.float64
        )
        sums[statistic_key(name, "input_abs_mean")] = torch.zeros(
            module.in_features, dtype=torch.float64
        )
    tokens = {name: 0 for name in modules}
    model.eval()
    for inputs, label in examples:
        calls = {name: [] for name in modules}
        handles = [
            module.register_forward_hook(
                lambda _, args, output, name=name, calls=calls: calls[name].append(
                    (args[0], output)
                )
            )
            for name, module in modules.items()
        ]
        try:
            loss = loss_of(model(**inputs).logits, label)
        finally:
            for handle in handles:
                handle.remove()
        outputs = [output for name in modules for _, output in calls[name]]
        gradients = iter(torch.autograd.grad(loss, outputs))
        for name in modules:
            for x, _ in calls[name]:
                g = next(gradients)
                x_rows = x.detach().double().reshape(-1, x.shape[-1])
                g_rows = g.double().reshape(-1, g.shape[-1])
                for t in range(x_rows.shape[0]):
                    sums[statistic_key(name, "input_moment")] += torch.outer(x_rows[t], x_rows[t])
                    sums[statistic_key(name, "input_abs_mean")] += x_rows[t].abs()
                    sums[statistic_key(name, "output_moment")] += torch.outer(g_rows[t], g_rows[t])
                tokens[name] += x_rows.shape[0]
    means = {}
    for key, total in sums.items():
        name, statistic = key.rsplit(".", 1)
        means[key] = total / (len(examples) if statistic == "output_moment" else tokens[name])
    return means, tokens


def cross_entropy_sum(logits, labels):
    return functional.cross_entropy(logits, labels, reduction="sum")


def alone(tokenizer, frame):
    """Each example by itself: unpadded encoding and its label."""
    return [
        (tokenizer([text], return_tensors="pt"), torch.tensor([label]))
        for text, label in zip(frame["text"], frame["label"], strict=True)
    ]


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize("mode", ["per_example", "minibatch"])
def test_statistics_equal_a_per_token_loop_over_examples_alone(mode):
    bundle = make_tiny_bundle(seed=5)
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    # Unsorted batches: examples of very different lengths share a padded batch.
    batches = make_batches(frame, bundle.tokenizer, batch_size=4, bucket_by_length=False)
    assert all((batch["attention_mask"] == 0).any() for batch in batches)
    found = calibrate(bundle.model, batches, mode=mode)

    modules = select_linear_modules(bundle.model)
    reference, tokens = per_token_reference(
        bundle.model, modules, alone(bundle.tokenizer, frame), cross_entropy_sum
    )
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert found.num_examples == len(frame) and found.num_tokens == real_tokens
    assert found.module_tokens == tokens == {name: real_tokens for name in modules}
    assert list(found.statistics) == list(reference) and len(reference) == 3 * 12
    for key, tensor in found.statistics.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert relative_error(tensor, reference[key]) <= 1e-5, key
    moment = found.statistics["bert.encoder.layer.0.output.dense.input_moment"]
    assert torch.equal(moment, moment.t())


def test_modules_fed_the_same_input_share_one_sum():
    bundle = make_tiny_bundle(seed=7)
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=3)
    found = calibrate(bundle.model, batches, statistics=("input_moment", "input_abs_mean"))
    for layer in range(2):
        prefix = f"bert.encoder.layer.{layer}.attention.self"
        for statistic in ("input_moment", "input_abs_mean"):
            query = found.statistics[f"{prefix}.query.{statistic}"]
            for other in ("key", "value"):
                assert torch.equal(found.statistics[f"{prefix}.{other}.{statistic}"], query)
        # Distinct tensors, so that one can be changed in place without the others.
        assert (
            found.statistics[f"{prefix}.query.input_moment"].data_ptr()
            != found.statistics[f"{prefix}.key.input_moment"].data_ptr()
        )


class TwoInputs(torch.nn.Module):
    """``first`` and ``second`` read the same tensor unless a batch says otherwise; ``twice`` is
    called twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(5, 4)
        self.second = torch.nn.Linear(5, 4)
        self.twice = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, features, shared):
        other = features if bool(shared) else features.flip(-1)
        hidden = torch.tanh(self.first(features) + self.second(other))
        hidden = torch.tanh(self.twice(torch.tanh(self.twice(hidden))))
        return SimpleNamespace(logits=self.head(hidden.mean(dim=1)))


def test_sharing_is_undone_when_inputs_part_and_calls_add_up():
    model = TwoInputs()
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(6, 3, 5, generator=generator)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    shared = [True, False, True]
    batches = [
        {
            "features": features[2 * b : 2 * b + 2],
            "shared": torch.tensor(s),
            "labels": labels[2 * b : 2 * b + 2],
        }
        for b, s in enumerate(shared)
    ]
    targets = ["first", "second", "twice"]
    found = calibrate(model, batches, targets=targets, mode="minibatch")
    modules = {name: getattr(model, name) for name in targets}
    examples = [
        (
            {"features": features[n : n + 1], "shared": torch.tensor(shared[n // 2])},
            labels[n : n + 1],
        )
        for n in range(6)
    ]
    reference, tokens = per_token_reference(model, modules, examples, cross_entropy_sum)
    # Without an attention mask every row counts: 6 examples × 3 rows (× 2 calls for ``twice``).
    assert found.module_tokens == tokens == {"first": 18, "second": 18, "twice": 36}
    for key, tensor in found.statistics.items():
        assert relative_error(tensor, reference[key]) <= 1e-5, key
    assert not torch.equal(
        found.statistics["first.input_moment"], found.statistics["second.input_moment"]
    )


def test_a_subset_returns_only_what_was_asked_and_the_fisher_is_unchanged():
    bundle = make_tiny_bundle(seed=8)
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=4, bucket_by_length=False)
    modules = list(select_linear_modules(bundle.model))
    for mode in ("per_example", "minibatch"):
        alone_fisher = empirical_fisher(bundle.model, batches, mode=mode)
        everything = calibrate(bundle.model, batches, mode=mode)
        for key, tensor in alone_fisher.items():
            assert torch.equal(everything.fisher[key], tensor), (mode, key)
    only = calibrate(bundle.model, batches, statistics=["output_moment"])
    assert list(only.statistics) == [f"{name}.output_moment" for name in modules]
    assert only.module_tokens == {}  # no input statistic asked
    none = calibrate(bundle.model, batches, statistics=())
    assert none.statistics == {} and none.statistics_seconds == 0.0
    reordered = calibrate(bundle.model, batches, statistics=["input_abs_mean", "input_moment"])
    assert list(reordered.statistics)[:2] == [
        f"{modules[0]}.input_moment",
        f"{modules[0]}.input_abs_mean",
    ]


@pytest.mark.parametrize("panel", [16, 64])
def test_float32_products_summed_in_float64_match_a_float64_reference(panel, monkeypatch):
    """CPU computes the lower triangle in column panels (16: three of them); CUDA a full GEMM
    (64: one panel)."""
    monkeypatch.setattr(calibration, "_panel_width", lambda size: panel)
    module = torch.nn.Linear(48, 40)
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(4, 30, 48, generator=generator) * 3 for _ in range(5)]
    gradients = [torch.randn(4, 30, 40, generator=generator) for _ in range(5)]
    accumulator = StatisticsAccumulator(
        {"m": module}, CALIBRATION_STATISTICS, torch.device("cpu"), flush_every=2
    )
    for x, g in zip(inputs, gradients, strict=True):
        accumulator.add({"m": [x]}, {"m": [g]}, None, examples=4)
    found, tokens = accumulator.result()
    x_all = torch.cat(inputs).reshape(-1, 48).double()
    g_all = torch.cat(gradients).reshape(-1, 40).double()
    expected = {
        "m.input_moment": x_all.t() @ x_all / 600,
        "m.output_moment": g_all.t() @ g_all / 20,
        "m.input_abs_mean": x_all.abs().mean(0),
    }
    assert tokens == {"m": 600} and list(found) == list(expected)
    for key, value in expected.items():
        assert relative_error(found[key], value) <= 1e-6, key
        assert torch.equal(found[key], found[key].t())


@pytest.mark.parametrize(
    ("statistics", "message"),
    [
        (["input_moments"], r"unknown calibration statistics \['input_moments'\]"),
        (["input_moment", "input_moment"], r"\['input_moment'\] are listed more than once"),
        ("input_moment", r"got the string 'input_moment'"),
    ],
)
def test_bad_statistics_are_named(statistics, message):
    bundle = make_tiny_bundle()
    batches = make_batches(varied_split(4, seed=0), bundle.tokenizer, batch_size=4)
    with pytest.raises(ValueError, match=message):
        calibrate(bundle.model, batches, statistics=statistics)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            ["input_moment", "kronecker"],
            r"statistics=\['input_moment', 'kronecker'\]: expected a list of names from .*unknown calibration statistics \['kronecker'\]",
        ),
        (
            ["output_moment", "output_moment"],
            r"statistics=\['output_moment', 'output_moment'\]: .*more than once",
        ),
        ("input_moment", r"statistics='input_moment': expected a list of names"),
        (None, r"statistics=None: expected a list of names"),
    ],
)
def test_the_statistics_parameter_rejects_bad_values_naming_them(value, message):
    with pytest.raises(ParameterError, match=r"fisher_estimation\." + message):
        FisherParams.model_validate(block_values("fisher_estimation", statistics=value))
    assert (
        FisherParams.model_validate(block_values("fisher_estimation", statistics=[])).statistics
        == ()
    )


def test_the_node_outputs_the_statistics_with_metadata_and_fingerprint():
    bundle = make_tiny_bundle(seed=9)
    split = varied_split(12, seed=4)
    model = typed_params("model", source="unused", max_length=16)
    params = typed_params("fisher_estimation", progress=False, batch_size=5, targets=None)
    assert params.statistics == CALIBRATION_STATISTICS  # the default: all three
    fisher, statistics, metrics = estimate_fisher(bundle, split, params, model, "cpu")

    modules = select_linear_modules(bundle.model)
    tensors = statistics["tensors"]
    assert list(tensors) == [
        f"{name}.{statistic}" for name in modules for statistic in CALIBRATION_STATISTICS
    ]
    for name, module in modules.items():
        assert tensors[f"{name}.input_moment"].shape == (module.in_features,) * 2
        assert tensors[f"{name}.output_moment"].shape == (module.out_features,) * 2
        assert tensors[f"{name}.input_abs_mean"].shape == (module.in_features,)
    metadata = statistics["metadata"]
    assert all(isinstance(value, str) for value in metadata.values())
    batches = make_batches(split, bundle.tokenizer, batch_size=5, max_length=16)
    assert metadata["num_tokens"] == str(sum(int(b["attention_mask"].sum()) for b in batches))
    assert metadata["num_examples"] == "12" and "module_tokens" not in metadata
    assert json.loads(metadata["statistics"]) == list(CALIBRATION_STATISTICS)
    assert "(1/T)" in metadata["normalisation"] and "(1/N)" in metadata["normalisation"]
    fingerprint = model_fingerprint(bundle.model)
    assert metadata["model_fingerprint"] == fingerprint == fingerprint_of(statistics)
    assert fingerprint_of(fisher) == fingerprint
    assert set(fisher["metadata"]) == set(metadata) - {
        "statistics",
        "num_tokens",
        "normalisation",
        "statistics_seconds",
    }
    assert 0.0 < metrics["statistics_share"]["value"] < 1.0

    inputs_only = typed_params(
        "fisher_estimation", progress=False, batch_size=5, statistics=["input_abs_mean"]
    )
    _, few, _ = estimate_fisher(bundle, split, inputs_only, model, "cpu")
    assert list(few["tensors"]) == [f"{name}.input_abs_mean" for name in modules]
    skipped = typed_params("fisher_estimation", progress=False, batch_size=5, statistics=[])
    _, nothing, metrics = estimate_fisher(bundle, split, skipped, model, "cpu")
    assert nothing["tensors"] == {} and json.loads(nothing["metadata"]["statistics"]) == []
    assert metrics["statistics_seconds"]["value"] == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_pass_runs_on_cuda_and_agrees_with_cpu():
    bundle = make_tiny_bundle(seed=10)
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=4, bucket_by_length=False)
    on_cpu = calibrate(bundle.model, batches)
    on_cuda = calibrate(bundle.model, batches, device="cuda")
    assert next(bundle.model.parameters()).device.type == "cpu"  # restored
    assert on_cuda.module_tokens == on_cpu.module_tokens
    for key, tensor in on_cpu.statistics.items():
        assert on_cuda.statistics[key].device.type == "cpu"
        assert relative_error(on_cuda.statistics[key], tensor.double()) <= 1e-5, key
