"""Architecture-aware model structure: transformer blocks, their projections, GPT-2's ``Conv1D``.

The default targets are found from the model's own structure (:func:`transformer_blocks`, then
:func:`default_target_names`), not from one architecture's module names. GPT-2's ``Conv1D``
(``x·W + b``, W stored in × out) becomes a :class:`Conv1DLinear` so every later step sees one
layer type; :func:`save_pretrained_model` writes the stock layout back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from weighted_lowrank.lowrank.layer import LowRankLinear, lowrank_modules, replace_module

#: Linear modules in a block that are not token projections: DeBERTa's relative-position ones (on
#: a table every example shares: no per-example gradient) and mixture-of-experts routers.
_NOT_PROJECTIONS = re.compile(
    r"(^|\.)(pos_key_proj|pos_query_proj|pos_proj|pos_q_proj|router|gate)$"
)
#: Config attributes holding the number of transformer blocks.
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


class Conv1DLinear(nn.Linear):
    """An ``nn.Linear`` computing what a transformers ``Conv1D`` does, its weight transposed to
    out × in (same state-dict keys; :func:`pretrained_state_dict` transposes it back)."""

    @classmethod
    def from_conv1d(cls, conv: nn.Module) -> Conv1DLinear:
        """The layer for ``conv`` on its device and dtype (bias reused, weight a transposed copy)."""
        weight = conv.weight
        in_features, out_features = weight.shape
        bias = getattr(conv, "bias", None)
        # Built on the meta device: the parameters are replaced at once, nothing to initialise.
        layer = cls(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(
            weight.detach().t().contiguous(), requires_grad=weight.requires_grad
        )
        if bias is not None:
            layer.bias = bias
        return layer


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` by a :class:`Conv1DLinear` in place; the names."""
    replaced: dict[int, Conv1DLinear] = {}
    names = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Conv1D):
            layer = replaced.setdefault(id(module), Conv1DLinear.from_conv1d(module))
            replace_module(model, name, layer)
            names.append(name)
    return names


def conv1d_modules(model: nn.Module) -> list[str]:
    """Names of the (not yet linearized) transformers ``Conv1D`` modules of ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


def pretrained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in its stock layout (tied parameters stay tied)."""
    state = model.state_dict()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Conv1DLinear):
            key = f"{name}.weight" if name else "weight"
            state[key] = module.weight.detach().t().contiguous()
    return state


def save_pretrained_model(model: nn.Module, directory: str | Path, **save_args: Any) -> None:
    """``model.save_pretrained`` in the layout stock ``from_pretrained`` reloads."""
    compressed = list(lowrank_modules(model))
    if compressed:
        raise ValueError(
            f"model has low-rank layers ({compressed[:3]}…); save_pretrained cannot write them in "
            "a layout from_pretrained reloads — use weighted_lowrank.lowrank.serialization."
            "save_compressed"
        )
    has_linearized = any(isinstance(module, Conv1DLinear) for module in model.modules())
    if has_linearized:
        if "state_dict" in save_args:
            raise ValueError(
                "save_pretrained_model builds the state_dict of a model with Conv1DLinear layers "
                "itself; do not pass one"
            )
        save_args["state_dict"] = pretrained_state_dict(model)
    model.save_pretrained(str(directory), **save_args)


def architecture_name(model: nn.Module) -> str:
    """``"<class> (model_type <type>)"``, for messages."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = type(model).__name__
    return f"{name} (model_type {model_type!r})" if model_type else name


def _layer_count(config: Any) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _module_lists(model: nn.Module, length: int) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ``nn.ModuleList`` of ``length`` items that each hold a Linear, in order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != length:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if all(any(map(_is_linear_like, item.modules())) for item in module):
            found.append((name, module))
    return found


def _children(name: str, module_list: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    prefix = f"{name}." if name else ""
    return [(f"{prefix}{index}", item) for index, item in enumerate(module_list)]


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every transformer block: the outermost ``nn.ModuleList`` as long as
    the config's layer count, its items holding Linear layers; ALBERT's distinct shared layers."""
    config = getattr(model, "config", None)
    groups = getattr(config, "num_hidden_groups", None)
    inner = getattr(config, "inner_group_num", None)
    if isinstance(groups, int) and isinstance(inner, int) and groups > 0 and inner > 0:
        blocks = []
        for name, group_list in _module_lists(model, groups):
            for group_name, group in _children(name, group_list):
                for inner_name, inner_list in _module_lists(group, inner):
                    full = f"{group_name}.{inner_name}" if inner_name else group_name
                    blocks.extend(_children(full, inner_list))
        if blocks:
            return blocks
    count = _layer_count(config)
    if count is not None:
        blocks = [
            child
            for name, module_list in _module_lists(model, count)
            for child in _children(name, module_list)
        ]
        if blocks:
            return blocks
    raise ValueError(
        f"{architecture_name(model)}: found no transformer blocks (no nn.ModuleList of "
        f"{count if count is not None else '<config num_hidden_layers>'} modules holding Linear "
        f"layers); its Linear modules are {_describe_linear(model)}. Name the layers to compress "
        "in compression.targets (a regex or a list of module names)"
    )


def _shape(module: nn.Module) -> str:
    weight = module.weight
    if isinstance(module, nn.Linear):
        return f"{module.out_features}x{module.in_features}"
    # Conv1D: (in × out) storage; report out × in like every Linear.
    return f"{weight.shape[1]}x{weight.shape[0]}"


def _describe_linear(model: nn.Module, limit: int = 40) -> str:
    entries = [
        f"{name} ({_shape(module)})"
        for name, module in model.named_modules()
        if _is_linear_like(module)
    ]
    if not entries:
        return "none"
    shown = ", ".join(entries[:limit])
    return shown if len(entries) <= limit else f"{shown}, … ({len(entries)} in all)"


def default_target_names(model: nn.Module) -> list[str]:
    """The attention and MLP ``nn.Linear`` projections of every block, in order."""
    blocks = transformer_blocks(model)
    names: list[str] = []
    unlinearized: list[str] = []
    for block_name, block in blocks:
        factorized: list[str] = []
        for sub_name, module in block.named_modules():
            if not sub_name:
                continue
            full = f"{block_name}.{sub_name}"
            if isinstance(module, LowRankLinear):
                factorized.append(f"{sub_name}.")
            if sub_name.startswith(tuple(factorized)):
                continue  # the factors of an already compressed layer are not projections
            if isinstance(module, Conv1D):
                unlinearized.append(full)
            elif isinstance(module, nn.Linear) and not _NOT_PROJECTIONS.search(sub_name):
                names.append(full)
    if unlinearized:
        raise ValueError(
            f"{architecture_name(model)} has transformers Conv1D projections "
            f"({unlinearized[:3]}…); call weighted_lowrank.lowrank.architectures."
            "linearize_conv1d(model) first (hf.load_base_model does)"
        )
    if not names:
        raise ValueError(
            f"{architecture_name(model)}: its transformer blocks ({blocks[0][0]}, …) hold no "
            f"attention or MLP nn.Linear projection; its Linear modules are "
            f"{_describe_linear(model)}. Name the layers to compress in compression.targets"
        )
    return names


def describe_projections(model: nn.Module) -> str:
    """The default projections and the other Linear modules, for messages."""
    try:
        projections = default_target_names(model)
    except ValueError as exc:
        return f"no default projections ({exc})"
    modules = dict(model.named_modules())
    blocks = [name for name, _ in transformer_blocks(model)]  # found: there are projections
    first = [name for name in projections if name.startswith(f"{blocks[0]}.")] or projections
    listed = ", ".join(f"{name} ({_shape(modules[name])})" for name in first)
    text = f"{len(projections)} projections in {len(blocks)} blocks; block 0: {listed}"
    chosen = set(projections)
    others = [
        f"{name} ({_shape(module)})"
        for name, module in modules.items()
        if _is_linear_like(module)
        and name not in chosen
        and not any(name.startswith(f"{block}.") for block in blocks)
    ]
    if others:
        text += f"; Linear modules outside the blocks: {', '.join(others[:10])}"
    return text
