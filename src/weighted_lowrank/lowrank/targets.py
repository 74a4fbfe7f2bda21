"""Which Linear modules of a model are compression targets, and what each one is."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from weighted_lowrank.lowrank.architectures import conv1d_modules, default_target_names

#: What ``targets: null`` selects (docs/METHOD.md, "targeted layers"; embeddings, heads stay dense).
DEFAULT_TARGETS_DESCRIPTION = "default: attention + MLP projections of every transformer block"


def select_linear_modules(
    model: nn.Module, targets: str | Iterable[str] | None = None
) -> dict[str, nn.Linear]:
    """``{module name: nn.Linear}`` of the targets in model order: a regex (``re.search``), module
    names, or ``None`` (the default projections, :func:`default_target_names`)."""
    linear = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    if targets is None:
        return {name: linear[name] for name in default_target_names(model)}
    if isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as exc:
            raise ValueError(f"targets regex {targets!r} is invalid: {exc}") from exc
        selected = {name: module for name, module in linear.items() if regex.search(name)}
        if not selected:
            raise ValueError(
                f"targets regex {targets!r} matches no nn.Linear module; "
                f"Linear modules are e.g. {sorted(linear)[:5]}{_conv1d_hint(model)}"
            )
        return selected
    names = list(targets)
    if not names:
        raise ValueError("targets is an empty list; expected module names or a regex")
    missing = [name for name in names if name not in linear]
    if missing:
        raise ValueError(
            f"targets {missing} are not nn.Linear modules of the model; "
            f"Linear modules are e.g. {sorted(linear)[:5]}{_conv1d_hint(model)}"
        )
    return {name: linear[name] for name in names}


def _conv1d_hint(model: nn.Module) -> str:
    conv = conv1d_modules(model)
    if not conv:
        return ""
    return (
        f"; {len(conv)} transformers Conv1D modules ({conv[0]}, …) are not linearized yet: call "
        "weighted_lowrank.lowrank.architectures.linearize_conv1d(model) first"
    )


#: The kinds of a block's projections, in the order a block computes them (``ffn_in`` also names a
#: fused gate+input projection such as ModernBERT's ``Wi``).
KIND_ORDER = ("query", "key", "value", "qkv", "attention_output", "ffn_gate", "ffn_in", "ffn_out")

#: Name suffix (whole dotted components) → kind of a block's projection, first match wins (so
#: BERT's ``attention.output.dense`` is found before its FFN ``output.dense``).
MODULE_KINDS = (
    # BERT, RoBERTa, ELECTRA (and BERT-style encoders)
    ("attention.self.query", "query"),
    ("attention.self.key", "key"),
    ("attention.self.value", "value"),
    ("attention.output.dense", "attention_output"),
    ("intermediate.dense", "ffn_in"),
    ("output.dense", "ffn_out"),
    # DeBERTa-v2/v3 (its attention.output.dense, intermediate.dense, output.dense as BERT's)
    ("attention.self.query_proj", "query"),
    ("attention.self.key_proj", "key"),
    ("attention.self.value_proj", "value"),
    # ALBERT
    ("attention.query", "query"),
    ("attention.key", "key"),
    ("attention.value", "value"),
    ("attention.dense", "attention_output"),
    ("ffn", "ffn_in"),
    ("ffn_output", "ffn_out"),
    # DistilBERT
    ("q_lin", "query"),
    ("k_lin", "key"),
    ("v_lin", "value"),
    ("out_lin", "attention_output"),
    ("ffn.lin1", "ffn_in"),
    ("ffn.lin2", "ffn_out"),
    # GPT-2 (Conv1D, linearized)
    ("attn.c_attn", "qkv"),
    ("attn.c_proj", "attention_output"),
    ("mlp.c_fc", "ffn_in"),
    ("mlp.c_proj", "ffn_out"),
    # ModernBERT
    ("attn.Wqkv", "qkv"),
    ("attn.Wo", "attention_output"),
    ("mlp.Wi", "ffn_in"),
    ("mlp.Wo", "ffn_out"),
    # LLaMA-style decoders (Mistral, Qwen2, …)
    ("q_proj", "query"),
    ("k_proj", "key"),
    ("v_proj", "value"),
    ("o_proj", "attention_output"),
    ("gate_proj", "ffn_gate"),
    ("up_proj", "ffn_in"),
    ("down_proj", "ffn_out"),
)


def ordered_kinds(kinds: Iterable[str]) -> list[str]:
    """The distinct ``kinds`` in a layer's computation order, unknown kinds last (sorted)."""
    present = set(kinds)
    known = [kind for kind in KIND_ORDER if kind in present]
    return known + sorted(present - set(known))


#: The block index in a module name: its first whole numeric component.
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def describe_module(name: str) -> tuple[int | None, str]:
    """``(layer index, kind)`` of a module name (:data:`MODULE_KINDS`)."""
    match = _LAYER_INDEX.search(name)
    layer = int(match.group(1)) if match else None
    for suffix, kind in MODULE_KINDS:
        if name == suffix or name.endswith(f".{suffix}"):
            return layer, kind
    return layer, name.rsplit(".", 1)[-1]
