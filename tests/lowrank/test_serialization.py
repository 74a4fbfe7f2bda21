"""Save and reload compressed models: LowRankConfig, save_compressed, load_compressed, accounting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertForSequenceClassification

from tests.conftest import TEXTS, logits_of, random_fisher
from weighted_lowrank.lowrank.compression import compress_model
from weighted_lowrank.lowrank.layer import lowrank_modules, lowrank_ranks
from weighted_lowrank.lowrank.serialization import (
    LOWRANK_CONFIG_FILE,
    LOWRANK_FORMAT_VERSION,
    WEIGHTS_FILE,
    LayerSpec,
    LowRankConfig,
    load_compressed,
    parameter_counts,
    save_compressed,
    serialized_size_bytes,
    tensors_for_saving,
)
from weighted_lowrank.lowrank.targets import select_linear_modules


def test_round_trip_gives_equal_logits_and_clear_keys(tmp_path, tiny_bundle):
    fisher = random_fisher(tiny_bundle.model)
    compressed, results = compress_model(tiny_bundle.model, fisher, 0.5, "svd")
    ranks = {name: result.rank for name, result in results.items()}
    save_compressed(compressed, tmp_path, tiny_bundle.tokenizer)
    reloaded = load_compressed(tmp_path)
    assert type(reloaded) is BertForSequenceClassification
    assert lowrank_ranks(reloaded) == ranks
    torch.testing.assert_close(
        logits_of(reloaded, tiny_bundle.tokenizer),
        logits_of(compressed, tiny_bundle.tokenizer),
        atol=1e-5,
        rtol=0,
    )
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    query = "bert.encoder.layer.0.attention.self.query"
    assert saved[f"{query}.right.weight"].shape == (ranks[query], 32)
    assert saved[f"{query}.left.weight"].shape == (32, ranks[query])
    assert f"{query}.left.bias" in saved and f"{query}.weight" not in saved
    rank_map = json.loads((tmp_path / LOWRANK_CONFIG_FILE).read_text())["modules"]
    assert {name: spec["rank"] for name, spec in rank_map.items()} == ranks
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer(TEXTS[0])["input_ids"] == tiny_bundle.tokenizer(TEXTS[0])["input_ids"]


def test_lowrank_config_round_trips_through_json(tmp_path, tiny_bundle):
    compressed, results = compress_model(tiny_bundle.model, None, 0.5, "svd")
    config = LowRankConfig.from_model(compressed, {"a.weight": "b.weight"})
    assert config.model_class == "BertForSequenceClassification" and config.dtype == "float32"
    assert config.format_version == LOWRANK_FORMAT_VERSION == 1
    assert config.tied == {"a.weight": "b.weight"}
    query = "bert.encoder.layer.0.attention.self.query"
    assert config.modules[query] == LayerSpec(
        rank=results[query].rank, in_features=32, out_features=32, bias=True
    )
    assert list(config.modules) == list(results)
    path = config.save(tmp_path)
    assert path == tmp_path / LOWRANK_CONFIG_FILE
    assert LowRankConfig.load(tmp_path) == config
    assert LowRankConfig.from_dict(json.loads(path.read_text())) == config
    assert path.read_text() == json.dumps(config.to_dict(), indent=2) + "\n"
    with pytest.raises(AttributeError):
        config.dtype = "float64"  # frozen


def test_lowrank_config_keeps_the_checks_and_texts_of_format_1(tmp_path):
    good = {"format_version": 1, "model_class": "X", "dtype": "float32", "modules": {}, "tied": {}}
    path = tmp_path / LOWRANK_CONFIG_FILE
    with pytest.raises(ValueError, match="is missing; expected a directory written by save_comp"):
        LowRankConfig.load(tmp_path)
    path.write_text(json.dumps({**good, "format_version": 2}))
    with pytest.raises(ValueError, match=f"{path} has format_version 2; expected 1"):
        LowRankConfig.load(tmp_path)
    for key in ("model_class", "dtype", "modules", "tied"):
        path.write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        with pytest.raises(ValueError, match=f"{path} has no '{key}' entry"):
            LowRankConfig.load(tmp_path)
    path.write_text(json.dumps({**good, "modules": {"m": {"rank": 1}}}))
    with pytest.raises(ValueError, match="module 'm' has no"):
        LowRankConfig.load(tmp_path)


def test_a_directory_in_the_format_saved_before_lowrank_config_still_loads(tmp_path, tiny_bundle):
    compressed, results = compress_model(tiny_bundle.model, None, 0.5, "svd")
    save_compressed(compressed, tmp_path)
    dense = select_linear_modules(tiny_bundle.model)
    # lowrank_config.json exactly as the first format-1 writer produced it (keys, order, indent).
    old = {
        "format_version": 1,
        "model_class": "BertForSequenceClassification",
        "dtype": "float32",
        "modules": {
            name: {
                "rank": result.rank,
                "in_features": dense[name].in_features,
                "out_features": dense[name].out_features,
                "bias": True,
            }
            for name, result in results.items()
        },
        "tied": {},
    }
    old_text = json.dumps(old, indent=2) + "\n"
    assert (tmp_path / LOWRANK_CONFIG_FILE).read_text() == old_text  # byte-compatible writer
    (tmp_path / LOWRANK_CONFIG_FILE).write_text(old_text)
    reloaded = load_compressed(tmp_path)
    assert lowrank_ranks(reloaded) == {name: result.rank for name, result in results.items()}
    torch.testing.assert_close(
        logits_of(reloaded, tiny_bundle.tokenizer),
        logits_of(compressed, tiny_bundle.tokenizer),
        atol=1e-5,
        rtol=0,
    )


def test_parameter_accounting_from_saved_tensors(tmp_path, tiny_bundle):
    dense = tiny_bundle.model
    compressed, results = compress_model(dense, None, 0.25, "svd")
    save_compressed(compressed, tmp_path / "compressed")
    save_compressed(dense, tmp_path / "dense")
    modules = list(results)
    targets = select_linear_modules(dense)
    params_before = sum(
        targets[name].weight.numel() + targets[name].out_features for name in modules
    )
    params_after = sum(
        r.rank * (targets[n].in_features + targets[n].out_features) + targets[n].out_features
        for n, r in results.items()
    )
    saved = parameter_counts(load_file(str(tmp_path / "compressed" / WEIGHTS_FILE)), modules)
    saved_dense = parameter_counts(load_file(str(tmp_path / "dense" / WEIGHTS_FILE)), modules)
    assert saved["layers"] == params_after
    assert saved_dense["layers"] == params_before
    assert saved_dense["model"] == sum(p.numel() for p in dense.parameters())
    assert saved["model"] == saved_dense["model"] - saved_dense["layers"] + saved["layers"]
    for name, directory in (("compressed", compressed), ("dense", dense)):
        assert serialized_size_bytes(directory) == (tmp_path / name / WEIGHTS_FILE).stat().st_size
    assert (tmp_path / "compressed" / WEIGHTS_FILE).stat().st_size < (
        tmp_path / "dense" / WEIGHTS_FILE
    ).stat().st_size


def test_tied_tensors_are_saved_once():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    tensors, aliases = tensors_for_saving(model)
    assert aliases == {"1.weight": "0.weight"}
    assert set(tensors) == {"0.weight", "0.bias", "1.bias"}


def test_dtype_survives_the_round_trip(tmp_path, tiny_bundle):
    model = tiny_bundle.model.to(torch.float64)
    compressed, _ = compress_model(model, None, 0.5, "svd")
    assert (
        lowrank_modules(compressed)["bert.encoder.layer.1.output.dense"].left.weight.dtype
        == torch.float64
    )
    save_compressed(compressed, tmp_path)
    assert LowRankConfig.load(tmp_path).dtype == "float64"
    reloaded = load_compressed(tmp_path)
    assert all(p.dtype == torch.float64 for p in reloaded.parameters())
    torch.testing.assert_close(
        logits_of(reloaded, tiny_bundle.tokenizer),
        logits_of(compressed, tiny_bundle.tokenizer),
        atol=1e-12,
        rtol=0,
    )


def test_load_is_strict_about_tensor_keys(tmp_path, tiny_bundle):
    compressed, _ = compress_model(tiny_bundle.model, None, 0.5, "svd")
    save_compressed(compressed, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    save_file({**tensors, "extra.weight": torch.zeros(1)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="unexpected keys \\['extra.weight'\\]"):
        load_compressed(tmp_path)
    del tensors["bert.encoder.layer.0.attention.self.key.left.weight"]
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(
        ValueError, match="missing keys \\['bert.encoder.layer.0.attention.self.key.left.weight'\\]"
    ):
        load_compressed(tmp_path)


def test_load_rejects_an_inconsistent_rank_map(tmp_path, tiny_bundle):
    compressed, _ = compress_model(tiny_bundle.model, None, 0.5, "svd")
    save_compressed(compressed, tmp_path)
    path = tmp_path / LOWRANK_CONFIG_FILE
    config = json.loads(path.read_text())
    config["modules"]["bert.encoder.layer.0.attention.self.query"]["rank"] += 1
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError):
        load_compressed(tmp_path)
    config["modules"]["bert.encoder.layer.0.attention.self.query"]["out_features"] = 5
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not replace an nn.Linear"):
        load_compressed(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match=LOWRANK_CONFIG_FILE):
        load_compressed(tmp_path)


def test_save_rejects_a_model_transformers_cannot_rebuild(tmp_path):
    with pytest.raises(ValueError, match="PreTrainedModel"):
        save_compressed(nn.Linear(2, 2), tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_round_trips_onto_cuda(tmp_path, tiny_bundle):
    model = tiny_bundle.model.to("cuda")
    compressed, _ = compress_model(model, random_fisher(tiny_bundle.model), 0.5, "svd")
    save_compressed(compressed, tmp_path, tiny_bundle.tokenizer)
    reloaded = load_compressed(tmp_path, device="cuda")
    batch = tiny_bundle.tokenizer(TEXTS, return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, compressed(**batch).logits, atol=1e-5, rtol=0
        )
