"""Fine-tuning and evaluation loops for sequence classifiers (one example per row) and causal
language models (examples: the token blocks of ``batching.encode_lm_blocks``), told apart by the
model's class."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from weighted_lowrank.hf.batching import (
    LM_REQUIRED_COLUMNS,
    REQUIRED_COLUMNS,
    batch_order,
    encode_examples,
    encode_lm_blocks,
    pad_examples,
)
from weighted_lowrank.lowrank.language_model import block_losses, is_causal_lm

TRAINING_POOL_BATCHES = 50


@dataclass(frozen=True)
class TrainingOptions:
    """Knobs of :func:`train_classifier` (a run's: ``TrainingLoopParams.training_options``)."""

    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 64
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_batch_size: int = 128


def check_split(frame: pd.DataFrame, name: str, causal_lm: bool = False) -> None:
    """Raise a clear error if ``frame`` is not a usable split (standard columns, non-empty)."""
    required = LM_REQUIRED_COLUMNS if causal_lm else REQUIRED_COLUMNS
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; it has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{name} is empty")


def iterate_batches(
    examples: list[dict[str, torch.Tensor]],
    batch_size: int,
    pad_token_id: int,
    seed: int,
    epoch: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of padded training batches, shuffled with ``[seed, epoch]`` and length-sorted
    within pools of batches: ~3 % padding instead of ~90 % (docs/METHOD.md, "Fine-tuning")."""
    lengths = np.array([example["input_ids"].numel() for example in examples])
    order = batch_order(
        lengths, batch_size, bucket_by_length=True, shuffle=True, seed=[seed, epoch],
        pool_batches=TRAINING_POOL_BATCHES,
    )  # fmt: skip
    for indices in order:
        yield pad_examples([examples[i] for i in indices], pad_token_id)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@dataclass(frozen=True)
class Predictions:
    """One pass of a model over a split in its example order (rows; a language model's blocks):
    float32 ``logits`` (examples, num_labels; 0 columns for a language model), each example's
    task loss, the mean loss as the model reports it; a language model's predicted ``tokens`` per
    block and how many the top-1 guess got ``correct``."""

    logits: np.ndarray
    losses: np.ndarray
    loss: float
    tokens: np.ndarray | None = None
    correct: np.ndarray | None = None

    @property
    def causal_lm(self) -> bool:
        return self.tokens is not None


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, config: object) -> torch.Tensor:
    """Each example's task loss as Hugging Face's classification heads define it (their batch
    loss is the mean)."""
    problem_type = getattr(config, "problem_type", None)
    num_labels = logits.shape[-1]
    if problem_type == "regression" or num_labels == 1:
        return (logits.reshape(len(labels), -1).squeeze(-1) - labels.to(logits.dtype)) ** 2
    if problem_type == "multi_label_classification":
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="none"
        ).mean(dim=-1)
    return torch.nn.functional.cross_entropy(
        logits.view(-1, num_labels), labels.view(-1).long(), reduction="none"
    )


@torch.inference_mode()
def predict_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    max_length: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> Predictions:
    """One forward pass per batch over ``frame`` (see :class:`Predictions`)."""
    causal_lm = is_causal_lm(model)
    check_split(frame, "evaluation split", causal_lm)
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    if causal_lm:
        result = _predict_blocks(model, tokenizer, frame, max_length, batch_size, device)
        model.train(was_training)
        return result
    examples = encode_examples(frame, tokenizer, max_length)
    order = sorted(range(len(examples)), key=lambda i: examples[i]["input_ids"].numel())
    logits = np.zeros((len(examples), model.config.num_labels), dtype=np.float32)
    losses = np.zeros(len(examples), dtype=np.float64)
    total_loss = 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = _to_device(
            pad_examples([examples[i] for i in rows], tokenizer.pad_token_id), device
        )
        output = model(**batch)
        total_loss += float(output.loss) * len(rows)
        logits[rows] = output.logits.float().cpu().numpy()
        losses[rows] = (
            per_example_loss(output.logits.float(), batch["labels"], model.config).cpu().numpy()
        )
    model.train(was_training)
    return Predictions(logits=logits, losses=losses, loss=total_loss / len(examples))


def _predict_blocks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    block_length: int,
    batch_size: int,
    device: torch.device,
) -> Predictions:
    examples = encode_lm_blocks(frame, tokenizer, block_length)
    losses = np.zeros(len(examples), dtype=np.float64)
    tokens = np.zeros(len(examples), dtype=np.int64)
    correct = np.zeros(len(examples), dtype=np.int64)
    for start in range(0, len(examples), batch_size):
        rows = slice(start, start + batch_size)
        batch = _to_device(pad_examples(examples[rows], tokenizer.pad_token_id), device)
        labels = batch.pop("labels")
        found = block_losses(model(**batch).logits, labels)
        losses[rows] = found.losses.double().cpu().numpy()
        tokens[rows] = found.tokens.cpu().numpy()
        correct[rows] = found.correct.cpu().numpy()
    return Predictions(
        logits=np.zeros((len(examples), 0), dtype=np.float32),
        losses=losses,
        loss=float((losses * tokens).sum() / max(int(tokens.sum()), 1)),
        tokens=tokens,
        correct=correct,
    )


def language_model_metrics(predictions: Predictions) -> dict[str, float]:
    """Perplexity and top-1 next-token accuracy over every predicted token of the split."""
    total = max(int(predictions.tokens.sum()), 1)
    return {
        "perplexity": float(np.exp(predictions.loss)),
        "token_accuracy": float(predictions.correct.sum() / total),
    }


def task_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and MCC for classification; Pearson/Spearman for regression."""
    if logits.shape[1] == 1:
        predictions = logits[:, 0]
        return {
            "pearson": float(stats.pearsonr(predictions, labels).statistic),
            "spearman": float(stats.spearmanr(predictions, labels).statistic),
        }
    predictions = logits.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average="macro")),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def evaluate_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    max_length: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Task metrics plus mean loss of ``model`` on a split."""
    result = predict_examples(model, tokenizer, frame, max_length, batch_size, device)
    return {**split_metrics(result, frame), "loss": result.loss}


def split_metrics(result: Predictions, frame: pd.DataFrame) -> dict[str, float]:
    """The task metrics of a pass over ``frame``."""
    if result.causal_lm:
        return language_model_metrics(result)
    return task_metrics(result.logits, frame["label"].to_numpy())


def train_classifier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    options: TrainingOptions,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune ``model``'s parameters that require grad in place with AdamW and linear
    warm-up/decay; one record per epoch: train loss, validation metrics, cumulative seconds."""
    causal_lm = is_causal_lm(model)
    check_split(train, "train split", causal_lm)
    check_split(validation, "validation split", causal_lm)
    device = torch.device(device)
    torch.manual_seed(options.seed)
    model.to(device)
    encode = encode_lm_blocks if causal_lm else encode_examples
    examples = encode(train, tokenizer, options.max_length)
    steps_per_epoch = math.ceil(len(examples) / options.batch_size)
    optimizer, scheduler = _adamw_with_schedule(model, options, steps_per_epoch * options.epochs)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(options.epochs):
        batches = tqdm(
            iterate_batches(
                examples, options.batch_size, tokenizer.pad_token_id, options.seed, epoch
            ),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{options.epochs}",
            disable=not progress,
        )
        train_loss = _train_epoch(model, batches, optimizer, scheduler, options, epoch, device)
        scores = evaluate_classifier(
            model, tokenizer, validation, options.max_length, options.eval_batch_size, device
        )
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                **{f"val_{key}": value for key, value in scores.items()},
                "seconds": time.perf_counter() - started,
            }
        )
    model.eval()
    return history


def _train_epoch(
    model: PreTrainedModel,
    batches: tqdm,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    options: TrainingOptions,
    epoch: int,
    device: torch.device,
) -> float:
    model.train()
    running_loss, seen = 0.0, 0
    for batch in batches:
        batch = _to_device(batch, device)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise ValueError(
                f"training loss became {float(loss)} at epoch {epoch + 1}; lower learning_rate"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], options.max_grad_norm
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running_loss += float(loss.detach()) * batch["labels"].shape[0]
        seen += batch["labels"].shape[0]
        batches.set_postfix(loss=f"{running_loss / seen:.4f}")
    return running_loss / seen


def _adamw_with_schedule(
    model: PreTrainedModel, options: TrainingOptions, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay on biases and LayerNorms, with linear warm-up then decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": options.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=options.learning_rate,
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(options.warmup_ratio * total_steps), total_steps
    )
    return optimizer, scheduler
