"""The next-token loss of causal language models, per example (plain torch).

An example is a *block* of tokens; its loss is the mean next-token NLL, as Hugging Face's
``…ForCausalLM`` heads compute it from ``labels = input_ids`` (``-100``: not predicted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

#: Label of a position that is not predicted (padding), as in Hugging Face and ``cross_entropy``.
IGNORE_INDEX = -100


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal-LM classes (next-token logits)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass(frozen=True)
class BlockLosses:
    """Per block of a batch: mean next-token NLL, predicted tokens, top-1 correct tokens."""

    losses: torch.Tensor
    tokens: torch.Tensor
    correct: torch.Tensor


def block_losses(logits: torch.Tensor, labels: torch.Tensor) -> BlockLosses:
    """Next-token losses of every block of a batch (a block with no predicted token: loss 0)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal-LM logits must be (batch, tokens, vocab) and labels (batch, tokens); got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    predicted = logits[:, :-1].float()
    targets = labels[:, 1:].long()
    mask = targets != IGNORE_INDEX
    nll = functional.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    tokens = mask.sum(dim=1)
    losses = (nll * mask).sum(dim=1) / tokens.clamp(min=1)
    correct = ((predicted.argmax(dim=-1) == targets) & mask).sum(dim=1)
    return BlockLosses(losses=losses, tokens=tokens, correct=correct)


def summed_block_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ of each block's mean next-token loss: a classifier's summed per-example loss's analogue."""
    return block_losses(logits, labels).losses.sum()
