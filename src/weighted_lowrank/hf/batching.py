"""Batches of tokenized text: length-bucketed examples for sequence classifiers (padded to their
own longest example, so nearly unpadded), equal token blocks for causal language models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from weighted_lowrank.lowrank.language_model import IGNORE_INDEX

REQUIRED_COLUMNS = ("text", "label")
#: A language-modelling split needs its documents only.
LM_REQUIRED_COLUMNS = ("text",)


def make_batches(
    frame: pd.DataFrame,
    tokenizer,
    *,
    batch_size: int = 32,
    max_length: int = 64,
    bucket_by_length: bool = True,
    shuffle: bool = False,
    seed: int = 0,
    pool_batches: int = 50,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``frame`` into batches ``model(**batch)`` accepts, right-padded to each batch's
    longest example. ``bucket_by_length`` sorts examples by token length: the whole frame without
    ``shuffle``; with it, pools of ``pool_batches × batch_size`` permuted examples, then the batch
    order shuffled. Labels: long for an integer column, else float32.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"frame lacks columns {missing}; expected 'text', optional 'text_pair', and 'label'"
        )
    if len(frame) == 0:
        raise ValueError("frame has no rows; expected at least one example")
    for column in ("label", "text"):
        if frame[column].isna().any():
            raise ValueError(f"column {column!r} has missing values")
    integer = np.issubdtype(frame["label"].to_numpy().dtype, np.integer)
    label_dtype = torch.long if integer else torch.float32
    examples = encode_examples(frame, tokenizer, max_length, label_dtype)
    lengths = np.array([example["input_ids"].numel() for example in examples])
    order = batch_order(lengths, batch_size, bucket_by_length, shuffle, seed, pool_batches)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [pad_examples([examples[i] for i in indices], pad_id) for indices in order]


def encode_examples(
    frame: pd.DataFrame, tokenizer, max_length: int, label_dtype: torch.dtype | None = None
) -> list[dict[str, torch.Tensor]]:
    """One unpadded example dict per row, ``labels`` included (float32 for float labels, else
    long, unless ``label_dtype`` says)."""
    texts = frame["text"].astype(str).tolist()
    pairs = frame["text_pair"].astype(str).tolist() if "text_pair" in frame.columns else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    if label_dtype is None:
        label_dtype = torch.float32 if pd.api.types.is_float_dtype(frame["label"]) else torch.long
    labels = torch.as_tensor(frame["label"].to_numpy(copy=True), dtype=label_dtype)
    if "attention_mask" not in encoded:
        encoded["attention_mask"] = [[1] * len(ids) for ids in encoded["input_ids"]]
    keys = [key for key in ("input_ids", "token_type_ids", "attention_mask") if key in encoded]
    return [
        {
            **{key: torch.as_tensor(encoded[key][i], dtype=torch.long) for key in keys},
            "labels": labels[i],
        }
        for i in range(len(texts))
    ]


def encode_lm_blocks(
    frame: pd.DataFrame, tokenizer, block_length: int
) -> list[dict[str, torch.Tensor]]:
    """The documents of ``frame["text"]``, each followed by end-of-text, concatenated and cut
    into blocks of ``block_length`` tokens as Hugging Face's ``run_clm`` groups texts (a shorter
    last block kept if it predicts a token); ``labels`` are the ids (the model shifts them)."""
    missing = [column for column in LM_REQUIRED_COLUMNS if column not in frame.columns]
    if missing or len(frame) == 0:
        raise ValueError(
            f"a language-modelling split needs a non-empty 'text' column; it has "
            f"{list(frame.columns)} and {len(frame)} rows"
        )
    encoded = tokenizer(frame["text"].astype(str).tolist(), verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
    starts = range(0, len(stream), block_length)
    blocks = [stream[start : start + block_length] for start in starts]
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
    if not blocks:
        raise ValueError(
            f"the split's {len(frame)} documents give fewer than 2 tokens; nothing to predict"
        )
    tensors = [torch.tensor(block, dtype=torch.long) for block in blocks]
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for ids in tensors
    ]


def make_lm_batches(
    frame: pd.DataFrame, tokenizer, *, batch_size: int = 32, block_length: int = 64
) -> list[dict[str, torch.Tensor]]:
    """:func:`encode_lm_blocks` of ``frame`` in consecutive batches of ``batch_size`` blocks."""
    examples = encode_lm_blocks(frame, tokenizer, block_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [
        pad_examples(examples[start : start + batch_size], pad_id)
        for start in range(0, len(examples), batch_size)
    ]


def pad_examples(
    examples: list[dict[str, torch.Tensor]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the longest: ``input_ids`` with ``pad_token_id``, token
    ``labels`` with -100, other columns with 0; scalar labels are stacked."""
    length = max(example["input_ids"].numel() for example in examples)
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        if key == "labels" and examples[0][key].dim() == 0:
            batch[key] = torch.stack([example[key] for example in examples])
            continue
        fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
        batch[key] = torch.stack(
            [
                torch.nn.functional.pad(
                    example[key], (0, length - example[key].numel()), value=fill
                )
                for example in examples
            ]
        )
    return batch


def batch_order(
    lengths: np.ndarray,
    batch_size: int,
    bucket_by_length: bool,
    shuffle: bool,
    seed: int | list[int],
    pool_batches: int,
) -> list[list[int]]:
    """Indices of the examples of each batch (see :func:`make_batches`); ``seed`` is anything
    ``numpy.random.default_rng`` takes (e.g. ``[run seed, epoch]``)."""
    rng = np.random.default_rng(seed)
    indices = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if bucket_by_length:
        pool = len(lengths) if not shuffle else pool_batches * batch_size
        chunks = [indices[start : start + pool] for start in range(0, len(indices), pool)]
        # stable sort keeps the original (or shuffled) order among equal lengths
        indices = np.concatenate(
            [chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in chunks]
        )
    batches = [
        indices[start : start + batch_size].tolist() for start in range(0, len(indices), batch_size)
    ]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
