"""Shared fixtures: a tiny random BERT with a WordPiece tokenizer trained offline (< 1 s)."""

from __future__ import annotations

import copy
import functools
import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
# OpenMP threads that spin while waiting stall each other when the 2 cores are shared; read by
# torch's OpenMP runtime at start-up, so it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.kedro_glue.parameters import BLOCKS, Block

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def conf_parameters(env: str = "base") -> dict[str, Any]:
    """The project's merged parameters (conf/base, plus ``env`` on top), as plain YAML values."""
    from kedro.config import OmegaConfigLoader

    from weighted_lowrank.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(
        str(PROJECT_ROOT / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": env}
    )
    return loader["parameters"]


def _deep_update(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(values)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def block_values(block: str, **overrides: Any) -> dict[str, Any]:
    """A parameter block's YAML values from conf/base, with ``overrides`` merged in (nested dicts
    merge key by key, as the ``soft`` merge strategy does for environments)."""
    return _deep_update(conf_parameters()[block], overrides)


def typed_params(block: str, **overrides: Any) -> Block:
    """The typed block a node receives in a run: conf/base's values with ``overrides``."""
    return BLOCKS[block].model_validate(block_values(block, **overrides))


TOY_POSITIVE = ["good great fine film", "a wonderful lovely movie", "great acting and fine story"]
TOY_NEGATIVE = ["bad awful boring film", "a terrible dull movie", "awful acting and bad story"]
TOY_CORPUS = TOY_POSITIVE + TOY_NEGATIVE + ["the of and a is it this that was with plot"]


def make_tokenizer(corpus: list[str] = TOY_CORPUS) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer with BERT's special tokens, built offline from ``corpus``.

    The vocabulary is derived deterministically (whole words, then characters and ``##``
    continuations, sorted): the ``tokenizers`` trainer breaks ties differently between runs,
    which would make seeded models differ.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({word for line in corpus for word in line.lower().split()})
    chars = sorted({char for word in words for char in word})
    tokens = specials + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    tok = Tokenizer(
        models.WordPiece({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]")
    )
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def make_tiny_bundle(
    num_labels: int = 2, seed: int = 0, hidden: int = 32, layers: int = 2
) -> ModelBundle:
    """A randomly initialised BERT classifier small enough for unit tests."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    model.eval()
    return ModelBundle(model=model, tokenizer=tokenizer)


TEXTS = [
    "good great fine film",
    "a terrible dull movie",
    "the plot was awful",
    "wonderful acting",
]


def logits_of(model, tokenizer) -> torch.Tensor:
    """The model's logits on a few fixed sentences (for save/load and surgery round trips)."""
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def random_fisher(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """A positive random importance for every default-targeted weight of ``model``."""
    from weighted_lowrank.lowrank.targets import select_linear_modules

    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name}.weight": torch.rand(module.weight.shape, generator=generator) + 0.05
        for name, module in select_linear_modules(model).items()
    }


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run many times faster on one thread, above all on a busy shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_bundle() -> ModelBundle:
    return make_tiny_bundle()


SENTIMENT_POSITIVE = ["good", "great", "fine", "wonderful", "lovely"]
SENTIMENT_NEGATIVE = ["bad", "awful", "boring", "terrible", "dull"]
FILLER = ["the", "film", "movie", "plot", "acting", "story", "a", "and"]
VARIED_WORDS = (
    "good great fine film bad awful boring dull a the movie plot acting story lovely".split()
)


def toy_split(n: int, seed: int) -> pd.DataFrame:
    """Sentences whose label is decided by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [
            rng.choice(SENTIMENT_POSITIVE if label else SENTIMENT_NEGATIVE)
        ]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def varied_split(rows: int, seed: int) -> pd.DataFrame:
    """Sentences of 1–12 words, so batches mix lengths and carry padding."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(VARIED_WORDS, k=rng.randint(1, 12))) for _ in range(rows)]
    return pd.DataFrame({"text": texts, "label": [i % 2 for i in range(rows)]})


def make_lm_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A whole-word tokenizer over :data:`VARIED_WORDS` for tiny causal LMs, built offline.

    GPT-2 style (``bos=False``): ``<|endoftext|>`` is its only special token, no padding token
    (as GPT-2's). LLaMA style (``bos=True``): ``<s>`` is prepended to every text, ``</s>`` ends
    it, no padding token either.
    """
    specials = ["<unk>", "<s>", "</s>"] if bos else ["<unk>", "<|endoftext|>"]
    words = sorted({word for line in TOY_CORPUS for word in line.split()} | set(VARIED_WORDS))
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
    )


def make_tiny_causal_lm(architecture: str, seed: int = 0, hidden: int = 32) -> ModelBundle:
    """A randomly initialised 2-block causal LM, ``gpt2`` (Conv1D layers, tied head) or
    ``llama`` (q/k/v/o and gate/up/down projections), with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = make_lm_tokenizer(bos=architecture == "llama")
    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=64, n_embd=hidden, n_layer=2, n_head=4,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
    elif architecture == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny causal LM {architecture!r}; expected gpt2 or llama")
    model.eval()
    return ModelBundle(model=model, tokenizer=tokenizer)


def lm_corpus(rows: int, seed: int) -> pd.DataFrame:
    """Documents of 3–12 words from :data:`VARIED_WORDS` (a language-modelling split)."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(VARIED_WORDS, k=rng.randint(3, 12))) for _ in range(rows)]
    return pd.DataFrame({"text": texts})
