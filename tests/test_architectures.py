"""Architecture-aware default targets, GPT-2's Conv1D, save/load and the targets check, on tiny
random models of every supported architecture (hidden 32, 2 layers, vocabulary 64)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.conftest import conf_parameters
from weighted_lowrank.hf.models import model_structure
from weighted_lowrank.kedro_glue.parameter_checks import ParameterChecks
from weighted_lowrank.kedro_glue.parameters import ParameterError
from weighted_lowrank.lowrank.architectures import (
    Conv1DLinear,
    default_target_names,
    linearize_conv1d,
    pretrained_state_dict,
    save_pretrained_model,
    transformer_blocks,
)
from weighted_lowrank.lowrank.compression import apply_factors, factorize_model
from weighted_lowrank.lowrank.fisher import calibrate
from weighted_lowrank.lowrank.layer import lowrank_modules, lowrank_ranks
from weighted_lowrank.lowrank.serialization import WEIGHTS_FILE, load_compressed, save_compressed
from weighted_lowrank.lowrank.targets import describe_module, ordered_kinds, select_linear_modules

VOCAB = 64
_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

BERT_BLOCK = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
BERT_KINDS = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")
GPT2_BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GPT2_KINDS = ("qkv", "attention_output", "ffn_in", "ffn_out")
LLAMA_BLOCK = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LLAMA_KINDS = ("query", "key", "value", "attention_output", "ffn_gate", "ffn_in", "ffn_out")

#: name → (config, task, block names, per-block suffixes, kinds, Linear modules never targeted).
ARCHITECTURES = {
    "bert": (
        lambda: transformers.BertConfig(**_SIZES, pad_token_id=0),
        "sequence_classification",
        ["bert.encoder.layer.0", "bert.encoder.layer.1"],
        BERT_BLOCK,
        BERT_KINDS,
        {"bert.pooler.dense", "classifier"},
    ),
    "roberta": (
        lambda: transformers.RobertaConfig(**_SIZES, **_IDS),
        "sequence_classification",
        ["roberta.encoder.layer.0", "roberta.encoder.layer.1"],
        BERT_BLOCK,
        BERT_KINDS,
        {"classifier.dense", "classifier.out_proj"},
    ),
    "distilbert": (
        lambda: transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, pad_token_id=0
        ),
        "sequence_classification",
        ["distilbert.transformer.layer.0", "distilbert.transformer.layer.1"],
        (
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "ffn.lin1",
            "ffn.lin2",
        ),
        BERT_KINDS,
        {"pre_classifier", "classifier"},
    ),
    # Relative attention with separate position projections: those stay out of the targets.
    "deberta_v2": (
        lambda: transformers.DebertaV2Config(
            **_SIZES,
            pad_token_id=0,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            share_att_key=False,
            position_buckets=8,
            max_relative_positions=16,
        ),
        "sequence_classification",
        ["deberta.encoder.layer.0", "deberta.encoder.layer.1"],
        (
            "attention.self.query_proj",
            "attention.self.key_proj",
            "attention.self.value_proj",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        BERT_KINDS,
        {
            "pooler.dense",
            "classifier",
            *(
                f"deberta.encoder.layer.{i}.attention.self.{name}"
                for i in (0, 1)
                for name in ("pos_key_proj", "pos_query_proj")
            ),
        },
    ),
    "electra": (
        lambda: transformers.ElectraConfig(**_SIZES, embedding_size=16, pad_token_id=0),
        "sequence_classification",
        ["electra.encoder.layer.0", "electra.encoder.layer.1"],
        BERT_BLOCK,
        BERT_KINDS,
        {"electra.embeddings_project", "classifier.dense", "classifier.out_proj"},
    ),
    # Two calls (num_hidden_layers 2) of one shared layer (one group of one layer).
    "albert": (
        lambda: transformers.AlbertConfig(**_SIZES, embedding_size=16, **_IDS),
        "sequence_classification",
        ["albert.encoder.albert_layer_groups.0.albert_layers.0"],
        (
            "attention.query",
            "attention.key",
            "attention.value",
            "attention.dense",
            "ffn",
            "ffn_output",
        ),
        BERT_KINDS,
        {"albert.encoder.embedding_hidden_mapping_in", "albert.pooler", "classifier"},
    ),
    "modernbert": (
        lambda: transformers.ModernBertConfig(**_SIZES, **_IDS, cls_token_id=1, sep_token_id=2),
        "sequence_classification",
        ["model.layers.0", "model.layers.1"],
        ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"),
        GPT2_KINDS,
        {"head.dense", "classifier"},
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_IDS
        ),
        "sequence_classification",
        ["transformer.h.0", "transformer.h.1"],
        GPT2_BLOCK,
        GPT2_KINDS,
        {"score"},
    ),
    "gpt2_lm": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_IDS
        ),
        "causal_lm",
        ["transformer.h.0", "transformer.h.1"],
        GPT2_BLOCK,
        GPT2_KINDS,
        {"lm_head"},
    ),
    "llama": (
        lambda: transformers.LlamaConfig(**_SIZES, **_IDS, num_key_value_heads=2),
        "sequence_classification",
        ["model.layers.0", "model.layers.1"],
        LLAMA_BLOCK,
        LLAMA_KINDS,
        {"score"},
    ),
    "llama_lm": (
        lambda: transformers.LlamaConfig(**_SIZES, **_IDS, num_key_value_heads=2),
        "causal_lm",
        ["model.layers.0", "model.layers.1"],
        LLAMA_BLOCK,
        LLAMA_KINDS,
        {"lm_head"},
    ),
}
_MODELS: dict[str, nn.Module] = {}


def build(name: str, linearize: bool = True) -> nn.Module:
    """A fresh copy of the tiny random model ``name`` (eval mode, Conv1D linearized)."""
    if name not in _MODELS:
        make_config, task = ARCHITECTURES[name][:2]
        torch.manual_seed(0)
        auto = (
            transformers.AutoModelForCausalLM
            if task == "causal_lm"
            else transformers.AutoModelForSequenceClassification
        )
        _MODELS[name] = auto.from_config(make_config()).eval()
    model = copy.deepcopy(_MODELS[name])
    if linearize:
        linearize_conv1d(model)
    return model


def batch(rows: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (no special ids) with the second row padded after 4 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_default_targets_are_the_block_projections_of_every_architecture(name):
    _, _, blocks, suffixes, kinds, others = ARCHITECTURES[name]
    model = build(name)
    assert [block for block, _ in transformer_blocks(model)] == blocks
    expected = [f"{block}.{suffix}" for block in blocks for suffix in suffixes]
    assert default_target_names(model) == expected
    selected = select_linear_modules(model, None)
    assert list(selected) == expected
    assert all(isinstance(module, nn.Linear) for module in selected.values())
    # Everything else that is Linear — embeddings projections, heads, pooler — stays dense.
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linear - set(expected) == others
    for target in expected:
        assert not any(
            part in target.lower()
            for part in ("embed", "pooler", "classifier", "score", "lm_head", "norm")
        )
    described = [describe_module(target) for target in expected]
    assert described == [(index, kind) for index in range(len(blocks)) for kind in kinds]
    assert ordered_kinds(kind for _, kind in described) == list(dict.fromkeys(kinds))


def test_bert_kinds_and_other_names_are_unchanged():
    assert describe_module("bert.encoder.layer.3.attention.output.dense") == (3, "attention_output")
    assert describe_module("bert.encoder.layer.3.output.dense") == (3, "ffn_out")
    assert describe_module("bert.pooler.dense") == (None, "dense")
    assert describe_module("classifier") == (None, "classifier")
    assert ordered_kinds(["ffn_out", "zeta", "qkv", "query", "ffn_gate"]) == [
        "query",
        "qkv",
        "ffn_gate",
        "ffn_out",
        "zeta",
    ]


def test_albert_groups_give_one_block_per_distinct_layer():
    config = transformers.AlbertConfig(
        **{**_SIZES, "num_hidden_layers": 4},
        embedding_size=16,
        num_hidden_groups=2,
        inner_group_num=2,
        **_IDS,
    )
    model = transformers.AlbertForSequenceClassification(config)
    blocks = [name for name, _ in transformer_blocks(model)]
    assert blocks == [
        f"albert.encoder.albert_layer_groups.{g}.albert_layers.{i}" for g in (0, 1) for i in (0, 1)
    ]
    assert len(default_target_names(model)) == 4 * 6


def test_a_model_without_blocks_is_named_with_its_linear_modules():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.BertConfig(**_SIZES)
            self.proj = nn.Linear(4, 3)

    with pytest.raises(
        ValueError, match=r"Tiny \(model_type 'bert'\).*no transformer blocks.*proj \(3x4\)"
    ):
        default_target_names(Tiny())


def test_conv1d_becomes_an_identical_linear_once():
    model = build("gpt2_lm", linearize=False)
    inputs = batch()
    before = logits(model, inputs)
    conv = model.transformer.h[0].attn.c_attn
    with pytest.raises(ValueError, match="linearize_conv1d"):
        default_target_names(model)
    with pytest.raises(ValueError, match="not linearized yet"):
        select_linear_modules(model, r"c_attn")
    replaced = linearize_conv1d(model)
    assert replaced == [f"transformer.h.{i}.{suffix}" for i in (0, 1) for suffix in GPT2_BLOCK]
    assert linearize_conv1d(model) == []
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer) is Conv1DLinear and isinstance(layer, nn.Linear)
    assert (layer.out_features, layer.in_features) == (96, 32)
    assert torch.equal(layer.weight, conv.weight.t())
    torch.testing.assert_close(logits(model, inputs), before, atol=1e-6, rtol=0)
    assert not any(isinstance(module, Conv1D) for module in model.modules())


def test_fine_tuned_gpt2_reloads_with_stock_from_pretrained(tmp_path):
    model = build("gpt2_lm")
    with torch.no_grad():  # "fine-tuning": every weight moves, the tied embedding included
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    assert model.lm_head.weight is model.transformer.wte.weight
    state = pretrained_state_dict(model)
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: in x out
    save_pretrained_model(model, tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.transformer.h[0].mlp.c_fc, Conv1D)
    linearize_conv1d(reloaded)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    inputs = batch()
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), atol=0, rtol=0)
    # A compressed model has no stock layout.
    compressed = apply_factors(model, factorize_model(model, None, 0.5, "svd"))
    with pytest.raises(ValueError, match="save_compressed"):
        save_pretrained_model(compressed, tmp_path / "x")


def test_save_pretrained_model_is_save_pretrained_without_conv1d(tmp_path):
    model = build("bert")
    save_pretrained_model(model, tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = batch()
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_compress_save_load_gives_identical_logits(tmp_path, name):
    model = build(name)
    targets = default_target_names(model)
    # Every third layer kept dense: a GPT-2 keeps Conv1DLinear layers beside the factors.
    ranks = {target: None if index % 3 == 0 else 3 for index, target in enumerate(targets)}
    compressed = apply_factors(model, factorize_model(model, None, None, "svd", ranks=ranks))
    # The factors of the low-rank layers are not projections; the dense ones still are.
    assert default_target_names(compressed) == [t for t, r in ranks.items() if r is None]
    save_compressed(compressed, tmp_path)
    reloaded = load_compressed(tmp_path)
    assert type(reloaded) is type(model)
    assert lowrank_ranks(reloaded) == {t: r for t, r in ranks.items() if r is not None}
    inputs = batch()
    torch.testing.assert_close(logits(reloaded, inputs), logits(compressed, inputs), atol=0, rtol=0)
    if name == "gpt2_lm":
        dense = reloaded.transformer.h[0].attn.c_attn  # index 0: kept dense
        assert type(dense) is Conv1DLinear
        assert reloaded.lm_head.weight is reloaded.transformer.wte.weight


def test_a_gpt2_whose_dense_layers_are_still_conv1d_saves_in_linear_layout(tmp_path):
    model = build("gpt2", linearize=False)
    compressed = apply_factors(
        model, factorize_model(model, None, None, "svd", ["score"], ranks={"score": 1})
    )
    save_compressed(compressed, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert saved["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)  # out x in
    reloaded = load_compressed(tmp_path)
    assert list(lowrank_modules(reloaded)) == ["score"]
    inputs = batch()
    torch.testing.assert_close(
        logits(reloaded, inputs), logits(compressed, inputs), atol=1e-6, rtol=0
    )


def _exact_fisher(model, inputs, labels, names, loss_of):
    """Σ_n (∇ℓ_n)² by one autograd pass per example (the definition)."""
    total = {
        name: torch.zeros_like(model.get_submodule(name).weight, dtype=torch.float64)
        for name in names
    }
    for n in range(labels.shape[0]):
        length = int(inputs["attention_mask"][n].sum())
        model.zero_grad()
        out = model(
            input_ids=inputs["input_ids"][n : n + 1, :length],
            attention_mask=inputs["attention_mask"][n : n + 1, :length],
        ).logits
        loss_of(out, labels[n : n + 1], length).backward()
        for name in names:
            total[name] += model.get_submodule(name).weight.grad.double().square()
    return total


def _classification_loss(out, label, length):
    return nn.functional.cross_entropy(out, label, reduction="sum")


@pytest.mark.parametrize(
    "name, make",
    [
        ("gpt2", None),
        ("albert", None),
        # DeBERTa-v3's setting: query_proj / key_proj also project the position table that every
        # example shares, so batches run one example at a time (still exact).
        (
            "deberta_v3",
            lambda: transformers.DebertaV2Config(
                **_SIZES,
                pad_token_id=0,
                relative_attention=True,
                pos_att_type=["p2c", "c2p"],
                share_att_key=True,
                position_buckets=8,
                max_relative_positions=16,
            ),
        ),
    ],
)
def test_calibrate_gives_the_exact_fisher_in_linear_shapes(name, make):
    if make is None:
        model = build(name)
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_config(make()).eval()
    inputs = batch()
    labels = torch.tensor([0, 1, 0])
    result = calibrate(model, [{**inputs, "labels": labels}])
    targets = select_linear_modules(model)
    assert list(result.fisher) == [f"{target}.weight" for target in targets]
    for target, module in targets.items():
        assert result.fisher[f"{target}.weight"].shape == (module.out_features, module.in_features)
        assert result.statistics[f"{target}.input_moment"].shape == (module.in_features,) * 2
        assert result.statistics[f"{target}.output_moment"].shape == (module.out_features,) * 2
    if name == "gpt2":
        assert result.fisher["transformer.h.0.mlp.c_fc.weight"].shape == (128, 32)
    # ALBERT: one weight called twice per example; its Fisher squares each example's summed
    # gradient over both calls, as autograd's per-example gradient does.
    exact = _exact_fisher(model, inputs, labels, list(targets), _classification_loss)
    for target in targets:
        torch.testing.assert_close(
            result.fisher[f"{target}.weight"].double(), exact[target], rtol=1e-4, atol=1e-9
        )
    assert result.num_examples == 3


def test_calibrate_runs_on_a_causal_gpt2():
    model = build("gpt2_lm")
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    result = calibrate(model, [{**inputs, "labels": labels}], statistics=())
    assert result.fisher["transformer.h.1.attn.c_attn.weight"].shape == (96, 32)
    assert all(tensor.sum() > 0 for tensor in result.fisher.values())


def test_model_structure_is_the_linearized_tree_on_meta(tmp_path):
    build("gpt2_lm").config.save_pretrained(tmp_path)  # the config alone: no weight is read
    structure = model_structure(str(tmp_path), "causal_lm")
    assert structure.transformer.h[0].attn.c_attn.weight.device.type == "meta"
    assert default_target_names(structure) == default_target_names(build("gpt2_lm"))


# ----------------------------------------------------------------------- check before training


def _check(tmp_path, pipeline, **overrides):
    base = conf_parameters()
    build("gpt2").config.save_pretrained(tmp_path)
    values = {**base, "model": {**base["model"], "source": str(tmp_path), "task": "auto"}}
    for block, changes in overrides.items():
        values[block] = {**values[block], **changes}
    catalog = DataCatalog({"parameters": MemoryDataset(values)})
    ParameterChecks().before_pipeline_run(run_params={}, pipeline=pipeline, catalog=catalog)


def _pipeline(*names):
    """Nodes named like the project's (``svd.compress`` = node ``compress`` in namespace ``svd``)."""
    nodes = []
    for index, name in enumerate(names):
        namespace, _, short = name.rpartition(".")
        nodes.append(Node(lambda: 0, None, f"out_{index}", name=short, namespace=namespace or None))
    return Pipeline(nodes)


def test_targets_that_fit_no_layer_fail_before_training_with_the_projections_listed(tmp_path):
    bert_style = {"targets": r"encoder\.layer\.\d+\.attention\.self\.query$"}
    with pytest.raises(ParameterError) as error:
        _check(tmp_path, _pipeline("initialise_model", "fine_tune"), compression=bert_style)
    message = str(error.value)
    assert "compression.targets=" in message and "GPT2ForSequenceClassification" in message
    assert "transformer.h.0.attn.c_attn (96x32)" in message
    assert "transformer.h.0.mlp.c_proj (32x128)" in message and "score (2x32)" in message
    named = {"targets": ["transformer.h.0.attn.c_attn", "transformer.h.9.attn.c_attn"]}
    with pytest.raises(ParameterError, match=r"transformer\.h\.9\.attn\.c_attn.*not nn\.Linear"):
        _check(tmp_path, _pipeline("svd.compress"), compression=named)
    # fisher_estimation.targets is checked when the run estimates the Fisher.
    with pytest.raises(ParameterError, match=r"fisher_estimation\.targets"):
        _check(tmp_path, _pipeline("estimate_fisher"), fisher_estimation={"targets": "nothing"})
    # Default targets and a matching regex pass; a run without such nodes is not checked.
    _check(tmp_path, _pipeline("fine_tune", "estimate_fisher"))
    _check(tmp_path, _pipeline("svd.compress"), compression={"targets": r"mlp\.c_fc$"})
    _check(tmp_path, _pipeline("split_records"), compression=bert_style)


def test_an_unreadable_model_source_skips_the_check(tmp_path, caplog):
    base = conf_parameters()
    values = {
        **base,
        "model": {**base["model"], "source": "nobody/not-cached-here", "task": "causal_lm"},
        "compression": {**base["compression"], "targets": "nothing"},
    }
    catalog = DataCatalog({"parameters": MemoryDataset(values)})
    with caplog.at_level(logging.WARNING, logger="weighted_lowrank.kedro_glue.hooks"):
        ParameterChecks().before_pipeline_run(
            run_params={}, pipeline=_pipeline("fine_tune"), catalog=catalog
        )
    assert "not checked before the run" in caplog.text
