"""The next-token loss of causal language models, per example (plain torch).

An example of a language-modelling split is a *block* of ``block_length`` tokens; its loss is
the mean negative log-likelihood of every token after the first given the tokens before it
(what Hugging Face's ``…ForCausalLM`` heads compute from ``labels = input_ids``: logits at
position ``t`` predict the label at ``t + 1``; positions labelled ``-100`` — padding — are not
predicted). Perplexity is ``exp`` of the token-weighted mean of those losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

#: Label of a position that is not predicted (padding), as in Hugging Face and ``cross_entropy``.
IGNORE_INDEX = -100


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal-LM classes (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``, …): its forward returns next-token logits (batch, tokens, vocab)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass(frozen=True)
class BlockLosses:
    """Per block of a batch: mean next-token NLL, predicted tokens, top-1 correct tokens."""

    losses: torch.Tensor
    tokens: torch.Tensor
    correct: torch.Tensor


def block_losses(logits: torch.Tensor, labels: torch.Tensor) -> BlockLosses:
    """Next-token losses of every block of a batch: ``logits`` (batch, tokens, vocab) predict
    ``labels`` (batch, tokens) shifted by one; ``-100`` labels are skipped. A block with no
    predicted token (one real token) has loss 0 and 0 tokens."""
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
    """Σ over the blocks of a batch of each block's mean next-token loss: the language-model
    counterpart of a classifier's summed per-example loss (the Fisher's ``ℓ_n``)."""
    return block_losses(logits, labels).losses.sum()
