"""Empirical Fisher: per-example mode equals a batch-size-1 loop; minibatch mode equals squared
batch gradients; eval mode, restored state, and clear errors."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch.nn import functional

from tests.conftest import make_tiny_bundle
from weighted_lowrank.hf.batching import make_batches
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.fisher import empirical_fisher, validate_fisher
from weighted_lowrank.lowrank.targets import select_linear_modules

TEXTS = [
    "good great fine film and a wonderful lovely movie with great acting",
    "bad",
    "a terrible dull movie",
    "great acting and fine story",
    "the plot",
    "awful acting and bad story it was boring",
    "a wonderful lovely movie",
]
LABELS = [1, 0, 0, 1, 0, 0, 1]
PAIRS = ["the plot", "a dull film and a bad story", "great", "it was", "lovely acting", "bad", "x"]


def brute_force_fisher(model, frame, tokenizer, loss_of, minibatch=None):
    """Σ over examples (or over minibatches of ``minibatch`` rows) of squared ``.grad``."""
    modules = select_linear_modules(model)
    totals = {
        f"{name}.weight": torch.zeros_like(module.weight, dtype=torch.float64)
        for name, module in modules.items()
    }
    size = minibatch or 1
    model.eval()
    for start in range(0, len(frame), size):
        rows = frame.iloc[start : start + size]
        pairs = rows["text_pair"].tolist() if "text_pair" in rows else None
        encoded = tokenizer(rows["text"].tolist(), pairs, padding=True, return_tensors="pt")
        model.zero_grad()
        loss_of(model(**encoded).logits, torch.tensor(rows["label"].tolist())).backward()
        for name, module in modules.items():
            totals[f"{name}.weight"] += module.weight.grad.double() ** 2
    return totals


def cross_entropy_sum(logits, labels):
    return functional.cross_entropy(logits, labels, reduction="sum")


def max_relative_error(estimate, reference):
    assert estimate.keys() == reference.keys()
    return max(
        float((estimate[k].double() - reference[k]).norm() / reference[k].norm()) for k in reference
    )


def with_extra_padding(batches, columns=5):
    """Append all-padding columns, as a tokenizer padding to a fixed max_length would."""
    padded = []
    for batch in batches:
        extra = {}
        for key, value in batch.items():
            if key == "labels":
                extra[key] = value
            else:
                extra[key] = torch.cat(
                    [value, torch.zeros(value.shape[0], columns, dtype=value.dtype)], 1
                )
        padded.append(extra)
    return padded


def test_per_example_equals_batch_size_one_loop_on_padded_mixed_lengths():
    bundle = make_tiny_bundle()
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    # Unsorted batches so examples of very different lengths share a padded batch.
    batches = with_extra_padding(
        make_batches(frame, bundle.tokenizer, batch_size=4, bucket_by_length=False)
    )
    assert any((batch["attention_mask"] == 0).any() for batch in batches)
    fisher = empirical_fisher(bundle.model, batches, mode="per_example")
    reference = brute_force_fisher(bundle.model, frame, bundle.tokenizer, cross_entropy_sum)
    assert max_relative_error(fisher, reference) <= 1e-5
    assert all(
        tensor.dtype == torch.float32 and tensor.device.type == "cpu" for tensor in fisher.values()
    )


def test_per_example_equals_loop_on_sentence_pairs():
    bundle = make_tiny_bundle(seed=3)
    frame = pd.DataFrame({"text": TEXTS, "text_pair": PAIRS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=3, bucket_by_length=False)
    assert any((batch["token_type_ids"] == 1).any() for batch in batches)
    fisher = empirical_fisher(bundle.model, batches)
    reference = brute_force_fisher(bundle.model, frame, bundle.tokenizer, cross_entropy_sum)
    assert max_relative_error(fisher, reference) <= 1e-5


def test_per_example_regression_uses_squared_error():
    bundle = make_tiny_bundle(num_labels=1, seed=1)
    scores = [0.5, 4.0, 1.5, 3.0, 2.0, 0.0, 5.0]
    frame = pd.DataFrame({"text": TEXTS, "label": scores})
    batches = make_batches(frame, bundle.tokenizer, batch_size=4, bucket_by_length=False)
    assert batches[0]["labels"].dtype == torch.float32
    fisher = empirical_fisher(bundle.model, batches)

    def squared_error_sum(logits, labels):
        return ((logits.squeeze(-1) - labels.float()) ** 2).sum()

    frame_float = frame.assign(label=frame["label"].astype(float))
    reference = brute_force_fisher(bundle.model, frame_float, bundle.tokenizer, squared_error_sum)
    assert max_relative_error(fisher, reference) <= 1e-5


def test_minibatch_mode_equals_squared_batch_gradients():
    bundle = make_tiny_bundle(seed=2)
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=3, bucket_by_length=False)
    fisher = empirical_fisher(bundle.model, batches, mode="minibatch")
    reference = brute_force_fisher(
        bundle.model, frame, bundle.tokenizer, cross_entropy_sum, minibatch=3
    )
    assert max_relative_error(fisher, reference) <= 1e-5
    per_example = empirical_fisher(bundle.model, batches, mode="per_example")
    assert max_relative_error(per_example, reference) > 1e-3  # the two estimators differ


def test_dropout_is_off_and_model_state_is_restored():
    bundle = make_tiny_bundle(seed=4)
    model = bundle.model
    model.config.hidden_dropout_prob = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=4)
    model.eval()
    in_eval = empirical_fisher(model, batches)
    model.train()
    model.classifier.weight.requires_grad_(False)
    frozen_query = model.bert.encoder.layer[0].attention.self.query.weight
    frozen_query.requires_grad_(False)
    in_train = empirical_fisher(model, batches)
    assert max_relative_error(in_train, {k: v.double() for k, v in in_eval.items()}) == 0.0
    assert model.training
    assert not frozen_query.requires_grad
    assert all(not module._forward_hooks for module in model.modules())


def test_targets_restrict_the_keys():
    bundle = make_tiny_bundle()
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=4)
    fisher = empirical_fisher(bundle.model, batches, targets=r"attention\.self\.query$")
    assert sorted(fisher) == [
        f"bert.encoder.layer.{i}.attention.self.query.weight" for i in range(2)
    ]
    full = empirical_fisher(bundle.model, batches)
    assert len(full) == 12
    for key, tensor in fisher.items():
        torch.testing.assert_close(tensor, full[key], rtol=1e-6, atol=0)


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: poisons the backward pass below a module."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradient_names_the_module():
    bundle = make_tiny_bundle()
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=4)
    attention = bundle.model.bert.encoder.layer[1].attention.self
    poisoned = attention.value

    def poison(module, args, output):
        # NaN enters the backward pass at the attention context: query, key and value of
        # layer 1 (value nearest the loss in module order) and everything below get NaN.
        if isinstance(output, tuple):
            return (_NanGradient.apply(output[0]), *output[1:])
        return _NanGradient.apply(output)

    handle = attention.register_forward_hook(poison)
    try:
        with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.value\.weight"):
            empirical_fisher(bundle.model, batches)
        with pytest.raises(ValueError, match=r"non-finite minibatch gradient"):
            empirical_fisher(bundle.model, batches, mode="minibatch")
    finally:
        handle.remove()
    with torch.no_grad():
        poisoned.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="loss is nan"):
        empirical_fisher(bundle.model, batches)


def test_bad_input_raises_before_work():
    bundle = make_tiny_bundle()
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=4)
    with pytest.raises(ValueError, match="mode 'exact'"):
        empirical_fisher(bundle.model, batches, mode="exact")
    without_labels = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    with pytest.raises(ValueError, match="no 'labels'"):
        empirical_fisher(bundle.model, without_labels)
    with pytest.raises(ValueError, match="no examples"):
        empirical_fisher(bundle.model, [])
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        empirical_fisher(bundle.model, batches, targets="nothing_like_this")


def test_validate_fisher_rejects_mismatches():
    bundle = make_tiny_bundle()
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    fisher = empirical_fisher(bundle.model, make_batches(frame, bundle.tokenizer, batch_size=4))
    modules = validate_fisher(bundle.model, fisher, targets=None)
    assert sorted(f"{name}.weight" for name in modules) == sorted(fisher)
    key = "bert.encoder.layer.0.attention.self.key.weight"
    with pytest.raises(ValueError, match="lacks targeted weights"):
        validate_fisher(
            bundle.model,
            {k: v for k, v in fisher.items() if k != key},
            targets=None or r"layer\.0\.",
        )
    with pytest.raises(ValueError, match="has shape"):
        validate_fisher(bundle.model, {**fisher, key: fisher[key].t()[:, :5]})
    with pytest.raises(ValueError, match="not '<Linear module>.weight'"):
        validate_fisher(
            bundle.model, {**fisher, "bert.encoder.layer.9.output.dense.weight": fisher[key]}
        )
    with pytest.raises(ValueError, match="negative"):
        validate_fisher(bundle.model, {**fisher, key: -fisher[key] - 1})


def test_model_fingerprint_tracks_weights():
    first, same, other = (
        make_tiny_bundle(seed=0),
        make_tiny_bundle(seed=0),
        make_tiny_bundle(seed=1),
    )
    assert model_fingerprint(first.model) == model_fingerprint(same.model)
    assert model_fingerprint(first.model) != model_fingerprint(other.model)


def test_make_batches_buckets_by_length_and_keeps_every_example():
    bundle = make_tiny_bundle()
    frame = pd.DataFrame({"text": TEXTS * 3, "label": LABELS * 3})
    sorted_batches = make_batches(frame, bundle.tokenizer, batch_size=4)
    lengths = [int(n) for batch in sorted_batches for n in batch["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)
    for batch in sorted_batches:
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    shuffled = make_batches(
        frame, bundle.tokenizer, batch_size=4, shuffle=True, seed=7, pool_batches=2
    )
    assert sum(len(b["labels"]) for b in shuffled) == len(frame)
    assert sorted(torch.cat([b["labels"] for b in shuffled]).tolist()) == sorted(
        frame["label"].tolist()
    )
    with pytest.raises(ValueError, match="lacks columns"):
        make_batches(frame.drop(columns="label"), bundle.tokenizer)


class SharedLinearClassifier(torch.nn.Module):
    """Applies one Linear twice (weight sharing): per-example gradients of both calls add up."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, features):
        hidden = torch.tanh(self.shared(features))
        hidden = torch.tanh(self.shared(hidden))
        return SimpleNamespace(logits=self.head(hidden.mean(dim=1)))


def test_per_example_sums_calls_of_a_shared_module_before_squaring():
    model = SharedLinearClassifier()
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(5, 4, 6, generator=generator)
    labels = torch.tensor([0, 2, 1, 1, 0])
    batches = [
        {"features": features[:3], "labels": labels[:3]},
        {"features": features[3:], "labels": labels[3:]},
    ]
    fisher = empirical_fisher(model, batches, targets=["shared"])
    reference = torch.zeros(6, 6, dtype=torch.float64)
    for n in range(5):
        model.zero_grad()
        cross_entropy_sum(model(features[n : n + 1]).logits, labels[n : n + 1]).backward()
        reference += model.shared.weight.grad.double() ** 2
    assert float((fisher["shared.weight"].double() - reference).norm() / reference.norm()) <= 1e-5


@pytest.mark.parametrize("flush", [1, 2, 100])
def test_per_example_totals_flushed_every_few_batches_equal_the_loop(monkeypatch, flush):
    # Batches of two: four batches, so flush=2 adds the float32 totals into float64 twice and
    # flush=100 only at the end (result); every setting equals the batch-size-1 loop.
    from weighted_lowrank.lowrank import fisher as fisher_module

    monkeypatch.setattr(fisher_module, "_FLUSH_BATCHES", flush)
    bundle = make_tiny_bundle(seed=5)
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=2, bucket_by_length=False)
    assert len(batches) == 4
    fisher = empirical_fisher(bundle.model, batches)
    reference = brute_force_fisher(bundle.model, frame, bundle.tokenizer, cross_entropy_sum)
    assert max_relative_error(fisher, reference) <= 1e-5


def test_a_non_finite_gradient_in_a_later_batch_names_that_batch(monkeypatch):
    from weighted_lowrank.lowrank import fisher as fisher_module

    monkeypatch.setattr(fisher_module, "_FLUSH_BATCHES", 8)
    bundle = make_tiny_bundle()
    frame = pd.DataFrame({"text": TEXTS, "label": LABELS})
    batches = make_batches(frame, bundle.tokenizer, batch_size=2, bucket_by_length=False)
    calls = {"count": 0}

    def poison(module, args, output):
        calls["count"] += 1
        return _NanGradient.apply(output) if calls["count"] == 3 else output

    handle = bundle.model.bert.encoder.layer[1].output.dense.register_forward_hook(poison)
    try:
        with pytest.raises(ValueError, match=r"on batch 2 "):
            empirical_fisher(bundle.model, batches)
    finally:
        handle.remove()
