"""Nodes of the ``evaluation`` pipeline: per row (``dense``, a solver, ``refined.<solver>``) a
record ``{"model_fingerprint", "metrics"}`` with the same metric keys in every row, and its
per-example predictions from the same forward pass.

Parameter counts are element counts of the tensors ``save_compressed`` writes (``tensors_for_
saving``: tied tensors once), exactly those of a reloaded model's ``model.safetensors``;
"layers" counts the targeted layers (those an allocation kept dense included), "model" every
tensor; ``size_on_disk_bytes`` is that file's exact size, serialized in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from weighted_lowrank.hf.latency import latency_by_shape_ms
from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.hf.training import Predictions, predict_examples, split_metrics
from weighted_lowrank.kedro_glue.lineage import with_fingerprint
from weighted_lowrank.kedro_glue.parameters import CompressionParams, EvaluationParams, ModelParams
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.objective import relative_loss
from weighted_lowrank.lowrank.serialization import (
    parameter_counts,
    serialized_size_bytes,
    tensors_for_saving,
)
from weighted_lowrank.lowrank.targets import select_linear_modules

#: Columns of a ``<namespace>.predictions`` table (then, for classification, one float32
#: ``logit_<k>`` per class: reporting's ``kl_to_dense`` needs them, the argmax cannot tell).
PREDICTION_COLUMNS = ("id", "label", "prediction", "loss")
#: Name prefix of the per-class logit columns of a predictions table.
LOGIT_PREFIX = "logit_"


def predictions_table(predictions: Predictions, test_split: pd.DataFrame) -> pd.DataFrame:
    """One row per example of the split (a language model's: per block), in its order; a
    classification table also holds every class's float32 logit (a regression's prediction is
    its single output already)."""
    ids = np.arange(len(predictions.losses), dtype=np.int64)
    loss = predictions.losses.astype(np.float64)
    if predictions.causal_lm:
        tokens, correct = predictions.tokens.astype(np.int64), predictions.correct.astype(np.int64)
        return pd.DataFrame({"id": ids, "tokens": tokens, "correct": correct, "loss": loss})
    logits = predictions.logits
    classes: dict[str, np.ndarray] = {}
    if logits.shape[1] == 1:
        predicted = logits[:, 0].astype(np.float64)
    else:
        predicted = logits.argmax(axis=1).astype(np.int64)
        classes = {
            f"{LOGIT_PREFIX}{k}": logits[:, k].astype(np.float32) for k in range(logits.shape[1])
        }
    labels = test_split["label"].to_numpy()
    return pd.DataFrame(
        {"id": ids, "label": labels, "prediction": predicted, "loss": loss, **classes}
    )


def score_examples(
    bundle: ModelBundle, test_split: pd.DataFrame, max_length: int, evaluation: EvaluationParams
) -> tuple[dict[str, float], pd.DataFrame]:
    """Task metrics with ``test_loss``, and the per-example predictions, of ``bundle`` on a split
    — one forward pass (model left on the CPU)."""
    predictions = predict_examples(
        bundle.model,
        bundle.tokenizer,
        test_split,
        max_length,
        batch_size=evaluation.batch_size,
        device=resolve_device(evaluation.device),
    )
    bundle.model.to("cpu")
    scores = {**split_metrics(predictions, test_split), "test_loss": float(predictions.loss)}
    return scores, predictions_table(predictions, test_split)


def evaluate_dense(
    fine_tuned_model: ModelBundle,
    test_split: pd.DataFrame,
    model: ModelParams,
    evaluation: EvaluationParams,
    compression: CompressionParams,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The dense fine-tuned model's record (the keys of :func:`evaluate_compressed`, on the
    layers ``compression.targets`` selects: ratios 1, nothing approximated) and predictions."""
    dense = fine_tuned_model.model.to("cpu")
    layers = list(select_linear_modules(dense, compression.targets))
    latency_ms = latency_by_shape_ms(
        {"dense": dense}, dense.config.vocab_size, **evaluation.latency.model_dump()
    )["dense"]
    scores, predictions = score_examples(fine_tuned_model, test_split, model.max_length, evaluation)
    metrics = _size_and_speed(dense, dense, layers, latency_ms, latency_ms)
    return _record(fine_tuned_model, scores, metrics, 0.0, 0.0, 0.0, predictions)


def evaluate_compressed(
    compressed_model: ModelBundle,
    fine_tuned_model: ModelBundle,
    layer_report: pd.DataFrame,
    rank_map: pd.DataFrame,
    test_split: pd.DataFrame,
    model: ModelParams,
    evaluation: EvaluationParams,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The record of one compressed model (as factorized, or refined) and its predictions.

    The targeted layers are the rank map's (that the model has its ranks, ``SavedVersionChecks``
    checks before the node runs). The weighted loss relative to SVD's, the factorization seconds
    and the predicted loss increase come from the solver's ``layer_report`` and ``rank_map``.
    """
    compressed = compressed_model.model.to("cpu")
    dense = fine_tuned_model.model.to("cpu")
    layers = rank_map["module"].tolist()
    timings = latency_by_shape_ms(
        {"dense": dense, "compressed": compressed},
        compressed.config.vocab_size,
        **evaluation.latency.model_dump(),
    )
    scores, predictions = score_examples(compressed_model, test_split, model.max_length, evaluation)
    metrics = _size_and_speed(compressed, dense, layers, timings["compressed"], timings["dense"])
    return _record(
        compressed_model,
        scores,
        metrics,
        relative_loss(
            float(layer_report["weighted_loss"].sum()), float(layer_report["svd_loss"].sum())
        ),
        float(layer_report["total_seconds"].iloc[0]),
        float(rank_map["predicted_loss"].sum()),
        predictions,
    )


def _size_and_speed(
    network: nn.Module, dense: nn.Module, layers: list[str], latency_ms: float, dense_ms: float
) -> dict[str, float]:
    """Parameter counts and ratios to ``dense``, size on disk and latency of ``network``."""
    counts = parameter_counts(tensors_for_saving(network)[0], layers)
    dense_counts = parameter_counts(tensors_for_saving(dense)[0], layers)
    return {
        "params_kept": float(counts["layers"]),
        "params_model": float(counts["model"]),
        "params_ratio_layers": counts["layers"] / dense_counts["layers"],
        "params_ratio_model": counts["model"] / dense_counts["model"],
        "size_on_disk_bytes": float(serialized_size_bytes(network)),
        "latency_ms": latency_ms,
        "latency_dense_ms": dense_ms,
        "latency_ratio": latency_ms / dense_ms,
    }


def _record(
    bundle: ModelBundle,
    scores: dict[str, float],
    size_and_speed: dict[str, float],
    weighted_loss_rel_svd: float,
    factorization_seconds: float,
    predicted_loss_increase: float,
    predictions: pd.DataFrame,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """A row's record (its metric keys in one order for every row) and predictions, stamped."""
    metrics = {
        **scores,
        "weighted_loss_rel_svd": weighted_loss_rel_svd,
        **size_and_speed,
        "factorization_seconds": factorization_seconds,
        "predicted_loss_increase": predicted_loss_increase,
    }
    record = with_fingerprint({"metrics": metrics}, bundle.model_fingerprint)
    return record, with_fingerprint(predictions, bundle.model_fingerprint)
