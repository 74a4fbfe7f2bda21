"""Causal language models end to end: token blocks, next-token loss and its Fisher, perplexity,
paired tests over blocks, save/load, and a smoke ``kedro run`` with a tiny random GPT-2 (Conv1D
layers, fine-tuned and refined) and a tiny random LLaMA-architecture model (compressed as given,
``fine_tuning.enabled: false``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from transformers import AutoModelForCausalLM

from tests.conftest import lm_corpus, make_tiny_causal_lm, random_fisher, typed_params
from tests.test_session import copy_project, run_smoke
from weighted_lowrank.analysis.paired import paired_loss_comparison
from weighted_lowrank.hf.batching import encode_lm_blocks, make_lm_batches, pad_examples
from weighted_lowrank.hf.models import ModelBundle, prepare_tokenizer, resolve_task
from weighted_lowrank.hf.training import predict_examples
from weighted_lowrank.kedro_glue.datasets import HFModelDataset
from weighted_lowrank.lowrank.architectures import linearize_conv1d
from weighted_lowrank.lowrank.compression import compress_model
from weighted_lowrank.lowrank.fisher import calibrate
from weighted_lowrank.lowrank.language_model import IGNORE_INDEX, block_losses
from weighted_lowrank.lowrank.layer import lowrank_modules
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.pipelines.data_processing.nodes import (
    clean_records,
    encode_labels,
    load_source_records,
    resolve_source,
    split_records,
)

ARCHITECTURES = ("gpt2", "llama")


def _bundle(architecture: str) -> ModelBundle:
    bundle = make_tiny_causal_lm(architecture)
    linearize_conv1d(bundle.model)
    prepare_tokenizer(bundle.tokenizer)
    return bundle


# ----------------------------------------------------------------------------- blocks and losses


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_blocks_cut_the_document_stream_without_losing_a_token(architecture) -> None:
    tokenizer = _bundle(architecture).tokenizer
    frame = lm_corpus(30, seed=0)
    blocks = encode_lm_blocks(frame, tokenizer, block_length=16)
    stream = []
    for text in frame["text"]:
        ids = tokenizer(text)["input_ids"]
        stream += [*ids, tokenizer.eos_token_id]
    assert (
        torch.cat([block["input_ids"] for block in blocks]).tolist()
        == stream[: sum(len(block["input_ids"]) for block in blocks)]
    )
    assert all(len(block["input_ids"]) == 16 for block in blocks[:-1])
    assert 2 <= len(blocks[-1]["input_ids"]) <= 16
    assert all(torch.equal(block["labels"], block["input_ids"]) for block in blocks)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_block_loss_is_hugging_faces_next_token_loss(architecture) -> None:
    bundle = _bundle(architecture)
    (batch, *_) = make_lm_batches(lm_corpus(40, 1), bundle.tokenizer, batch_size=4, block_length=12)
    with torch.no_grad():
        reference = bundle.model(**batch).loss  # HF's mean over every predicted token
        labels = batch.pop("labels")
        found = block_losses(bundle.model(**batch).logits, labels)
    assert found.tokens.tolist() == [11] * 4
    torch.testing.assert_close(found.losses.mean(), reference, rtol=1e-5, atol=1e-6)


def test_padding_changes_no_block_loss() -> None:
    bundle = _bundle("llama")
    blocks = encode_lm_blocks(lm_corpus(20, 2), bundle.tokenizer, block_length=10)
    short = {key: value[:6] for key, value in blocks[0].items()}
    padded = pad_examples([short, blocks[1]], bundle.tokenizer.pad_token_id)
    assert padded["labels"][0, 6:].eq(IGNORE_INDEX).all()
    with torch.no_grad():
        labels = padded.pop("labels")
        together = block_losses(bundle.model(**padded).logits, labels)
        alone = pad_examples([short], bundle.tokenizer.pad_token_id)
        single = block_losses(
            bundle.model(**{"input_ids": alone["input_ids"]}).logits, alone["labels"]
        )
    assert together.tokens.tolist() == [5, 9]
    torch.testing.assert_close(together.losses[0], single.losses[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_per_example_fisher_of_the_next_token_loss_matches_brute_force(architecture) -> None:
    bundle = _bundle(architecture)
    model = bundle.model
    batches = make_lm_batches(lm_corpus(12, 3), bundle.tokenizer, batch_size=3, block_length=8)
    found = calibrate(model, batches, mode="per_example", statistics=())
    modules = select_linear_modules(model)
    expected = {name: torch.zeros_like(module.weight) for name, module in modules.items()}
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            labels = batch["labels"][row : row + 1]
            logits = model(input_ids=batch["input_ids"][row : row + 1]).logits
            loss = block_losses(logits, labels).losses.sum()
            grads = torch.autograd.grad(loss, [m.weight for m in modules.values()])
            for name, grad in zip(modules, grads, strict=True):
                expected[name] += grad.square()
    assert found.num_examples == sum(len(batch["input_ids"]) for batch in batches)
    for name in modules:
        torch.testing.assert_close(
            found.fisher[f"{name}.weight"], expected[name], rtol=1e-4, atol=1e-10
        )


def test_perplexity_is_exp_of_the_token_weighted_loss() -> None:
    bundle = _bundle("gpt2")
    frame = lm_corpus(25, 4)
    result = predict_examples(bundle.model, bundle.tokenizer, frame, max_length=16, batch_size=3)
    blocks = encode_lm_blocks(frame, bundle.tokenizer, 16)
    assert result.causal_lm and len(result.losses) == len(blocks)
    assert result.tokens.tolist() == [len(block["input_ids"]) - 1 for block in blocks]
    assert result.loss == pytest.approx(np.average(result.losses, weights=result.tokens))
    assert result.logits.shape == (len(blocks), 0)


def test_paired_loss_comparison_is_a_sign_test_and_a_token_weighted_difference() -> None:
    rng = np.random.default_rng(0)
    loss_b = rng.uniform(2, 4, 200)
    loss_a = loss_b + rng.normal(-0.05, 0.2, 200)
    tokens = rng.integers(5, 64, 200)
    result = paired_loss_comparison(loss_a, loss_b, tokens, resamples=2000, seed=1)
    wins, losses = int((loss_a < loss_b).sum()), int((loss_a > loss_b).sum())
    assert (result.wins, result.losses) == (wins, losses)
    assert result.p_value == pytest.approx(stats.binomtest(wins, wins + losses).pvalue)
    assert result.diff == pytest.approx(
        np.average(loss_a, weights=tokens) - np.average(loss_b, weights=tokens)
    )
    assert result.ci_low < result.diff < result.ci_high
    same = paired_loss_comparison(loss_b, loss_b, tokens, resamples=100, seed=1)
    assert (same.wins, same.losses, same.p_value, same.diff) == (0, 0, 1.0, 0.0)
    assert same.ci_low == same.ci_high == 0.0


# ----------------------------------------------------------------------------- data, task, storage


def test_a_corpus_keeps_texts_only_and_splits_at_random(tmp_path) -> None:
    model_dir = tmp_path / "gpt2"
    bundle = make_tiny_causal_lm("gpt2")
    bundle.model.save_pretrained(model_dir)
    bundle.tokenizer.save_pretrained(model_dir)
    model = typed_params("model", source=str(model_dir))
    data = typed_params("data", split={"train": 40, "validation": 10, "test": 20, "seed": 3})
    assert resolve_task(str(model_dir), "auto") == "causal_lm"
    reviews = pd.DataFrame(
        {"text": [f"film number {i}" for i in range(80)] + ["", None], "category": ["x"] * 82}
    )
    source = resolve_source(data, model)
    records, names = encode_labels(
        clean_records(load_source_records(reviews, source), source), source
    )
    train, validation, test = split_records(records, data, names)
    assert names == [] and list(train.columns) == ["text"]
    assert [len(train), len(validation), len(test)] == [40, 10, 20]
    assert not set(train["text"]) & set(test["text"])
    again = split_records(records, data, names)[0]
    pd.testing.assert_frame_equal(train, again)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fine_tuned_and_compressed_language_models_reload_with_identical_logits(
    architecture, tmp_path
) -> None:
    bundle = _bundle(architecture)
    batch = make_lm_batches(lm_corpus(8, 5), bundle.tokenizer, batch_size=4, block_length=8)[0]
    inputs = {"input_ids": batch["input_ids"]}
    plain = HFModelDataset(filepath=str(tmp_path / "plain"))
    plain.save(bundle)
    # Saved in the stock layout: transformers alone reloads it (Conv1D weights for GPT-2).
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    reloaded = plain.load()
    with torch.no_grad():
        expected = bundle.model(**inputs).logits
        torch.testing.assert_close(stock(**inputs).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(reloaded.model(**inputs).logits, expected, rtol=0, atol=0)

    compressed_model, _ = compress_model(bundle.model, random_fisher(bundle.model), 0.3, "svd")
    compressed = HFModelDataset(filepath=str(tmp_path / "compressed"), compressed=True)
    compressed.save(ModelBundle(compressed_model, bundle.tokenizer))
    back = compressed.load().model
    assert set(lowrank_modules(back)) == set(select_linear_modules(bundle.model))
    with torch.no_grad():
        torch.testing.assert_close(
            back(**inputs).logits, compressed_model(**inputs).logits, rtol=0, atol=0
        )


# ----------------------------------------------------------------------------- kedro run (smoke)


LM_METRICS = {"perplexity", "token_accuracy", "test_loss", "params_ratio_layers", "latency_ms"}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm_smoke_run(request, tmp_path_factory):
    """GPT-2: fine-tuned, compressed and refined (``refined``); LLaMA: compressed as given
    (``__default__`` with ``fine_tuning.enabled: false``)."""
    architecture = request.param
    project = tmp_path_factory.mktemp(f"project_{architecture}")
    model_dir = copy_project(project, make_tiny_causal_lm(architecture))
    if architecture == "gpt2":
        return architecture, run_smoke(project, model_dir, "refined")
    params = {"fine_tuning": {"enabled": False}}
    return architecture, run_smoke(project, model_dir, "__default__", params)


def test_language_models_run_the_whole_graph_with_perplexity_everywhere(lm_smoke_run) -> None:
    architecture, run = lm_smoke_run
    rows = {"dense", *SOLVERS}
    if architecture == "gpt2":
        rows |= {f"refined.{solver}" for solver in SOLVERS}
    assert set(run.children) == rows
    dense_metrics = set(run.children["dense"].data.metrics)
    assert LM_METRICS <= dense_metrics and "accuracy" not in dense_metrics
    for name, child in run.children.items():
        metrics = child.data.metrics
        groups = {metric for metric in metrics if metric.startswith("iterations.")}
        assert set(metrics) - groups == dense_metrics, name
        assert metrics["perplexity"] == pytest.approx(np.exp(metrics["test_loss"]))
    table = pd.read_parquet(run.project / "data" / "08_reporting" / "comparison.parquet")
    assert set(table["namespace"]) == rows
    assert table["vs_svd_p"].drop(table.index[table["namespace"] == "svd"]).between(0, 1).all()
    markdown = (run.project / "data" / "08_reporting" / "comparison.md").read_text()
    assert "Δ test loss" in markdown.split("## Paired tests")[1]


def test_fine_tuning_is_optional_for_a_language_model(lm_smoke_run) -> None:
    architecture, run = lm_smoke_run
    metrics = run.parent.data.metrics
    assert "fine_tuning.val_perplexity" in metrics
    assert ("fine_tuning.train_loss" in metrics) == (architecture == "gpt2")
    if architecture == "llama":  # as given: the saved model is the one the run started from
        (version,) = (run.project / "data" / "06_models" / "fine_tuned_model").iterdir()
        saved = load_file(version / "fine_tuned_model" / "model.safetensors")
        original = load_file(run.model_dir / "model.safetensors")
        assert saved.keys() == original.keys()
        assert all(torch.equal(saved[key], original[key]) for key in saved)
