"""Which Linear modules of a model are compression targets."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

#: Attention Q/K/V/O and the two FFN projections of every encoder layer (BERT-style names).
#: Embeddings, pooler and classifier stay dense: the setting of the research this project
#: reproduces (docs/METHOD.md, row "targeted layers" of the choices table).
DEFAULT_TARGETS = (
    r"(^|\.)encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$"
)


def select_linear_modules(
    model: nn.Module, targets: str | Iterable[str] | None = None
) -> dict[str, nn.Linear]:
    """Return ``{module name: nn.Linear}`` for the targeted Linear modules, in model order.

    ``targets`` is a regular expression matched with ``re.search`` against module names, an
    iterable of exact module names, or ``None`` for :data:`DEFAULT_TARGETS`.
    Raises ``ValueError`` when nothing matches or a named module is missing / not Linear.
    """
    linear = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    if targets is None or isinstance(targets, str):
        pattern = DEFAULT_TARGETS if targets is None else targets
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"targets regex {pattern!r} is invalid: {exc}") from exc
        selected = {name: module for name, module in linear.items() if regex.search(name)}
        if not selected:
            raise ValueError(
                f"targets regex {pattern!r} matches no nn.Linear module; "
                f"Linear modules are e.g. {sorted(linear)[:5]}"
            )
        return selected
    names = list(targets)
    if not names:
        raise ValueError("targets is an empty list; expected module names or a regex")
    missing = [name for name in names if name not in linear]
    if missing:
        raise ValueError(
            f"targets {missing} are not nn.Linear modules of the model; "
            f"Linear modules are e.g. {sorted(linear)[:5]}"
        )
    return {name: linear[name] for name in names}


#: Name suffix → kind of a BERT-style encoder Linear, in the order the layer computes them.
MODULE_KINDS = (
    ("attention.self.query", "query"),
    ("attention.self.key", "key"),
    ("attention.self.value", "value"),
    ("attention.output.dense", "attention_output"),
    ("intermediate.dense", "ffn_in"),
    ("output.dense", "ffn_out"),
)


def ordered_kinds(kinds: Iterable[str]) -> list[str]:
    """The distinct ``kinds`` in a layer's computation order, unknown kinds last (sorted)."""
    present = set(kinds)
    known = [kind for _, kind in MODULE_KINDS if kind in present]
    return known + sorted(present - set(known))


def describe_module(name: str) -> tuple[int | None, str]:
    """``(layer index, kind)`` of a BERT-style Linear name, for tables and plots.

    Kinds: query, key, value, attention_output, ffn_in, ffn_out; other names keep their last
    component (layer None when the name has no ``layer.<i>``).
    """
    match = re.search(r"layer\.(\d+)\.", name)
    layer = int(match.group(1)) if match else None
    for suffix, kind in MODULE_KINDS:
        if name.endswith(suffix):
            return layer, kind
    return layer, name.rsplit(".", 1)[-1]
