"""Nodes of the ``evaluation`` pipeline: task metrics, parameter counts, size, latency.

Every row (``dense``, one namespace per solver and, in the ``refinement`` pipeline, one
``refined.<solver>`` per solver) returns a JSON record ``{"model_fingerprint": …, "metrics":
{name: float}}`` stamped with the evaluated model's lineage (:mod:`weighted_lowrank.lineage`).
``metrics`` has the same keys in every row: the task metrics (accuracy, f1, mcc for
classification; pearson, spearman for regression), test_loss, weighted_loss_rel_svd, params_kept,
params_model, params_ratio_layers, params_ratio_model, size_on_disk_bytes, latency_ms,
latency_dense_ms, latency_ratio, factorization_seconds.

Parameter counts are element counts of the tensors ``save_compressed`` writes
(:func:`~weighted_lowrank.lowrank.serialization.tensors_for_saving`: the state dict, tied tensors
once); for a model reloaded by ``load_compressed`` these are exactly the tensors of its
``model.safetensors`` (the load is strict). "layers" counts the targeted layers (weights and
biases), "model" every tensor. ``size_on_disk_bytes`` is the exact size of that
``model.safetensors``, serialized in memory.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.latency import measure_latency_ms
from weighted_lowrank.lineage import with_fingerprint
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.layer import lowrank_ranks
from weighted_lowrank.lowrank.objective import relative_loss
from weighted_lowrank.lowrank.serialization import (
    parameter_counts,
    serialized_size_bytes,
    tensors_for_saving,
)
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.parameters import CompressionParams, EvaluationParams, ModelParams
from weighted_lowrank.training import predict, task_metrics


def evaluation_record(bundle: ModelBundle, metrics: dict[str, float]) -> dict[str, Any]:
    """The JSON record of one evaluated model: its metrics, stamped with its lineage."""
    return with_fingerprint({"metrics": metrics}, bundle.model_fingerprint)


def score_split(
    bundle: ModelBundle, test_split: pd.DataFrame, max_length: int, evaluation: EvaluationParams
) -> dict[str, float]:
    """Task metrics and ``test_loss`` of ``bundle`` on a split (model left on the CPU)."""
    logits, loss = predict(
        bundle.model,
        bundle.tokenizer,
        test_split,
        max_length,
        batch_size=evaluation.batch_size,
        device=resolve_device(evaluation.device),
    )
    bundle.model.to("cpu")
    return {**task_metrics(logits, test_split["label"].to_numpy()), "test_loss": float(loss)}


def evaluate_dense(
    fine_tuned_model: ModelBundle,
    test_split: pd.DataFrame,
    model: ModelParams,
    evaluation: EvaluationParams,
    compression: CompressionParams,
) -> dict[str, Any]:
    """The record of the dense fine-tuned model, with the metric keys of :func:`evaluate_compressed`.

    Its targeted layers are those ``compression.targets`` selects; ratios are 1, its weighted loss
    relative to SVD 0 (nothing is approximated), its factorization time 0.
    """
    dense = fine_tuned_model.model.to("cpu")
    layers = list(select_linear_modules(dense, compression.targets))
    counts = parameter_counts(tensors_for_saving(dense)[0], layers)
    latency_ms = measure_latency_ms(
        {"dense": dense}, dense.config.vocab_size, **evaluation.latency
    )["dense"]
    scores = score_split(fine_tuned_model, test_split, model.max_length, evaluation)
    return evaluation_record(
        fine_tuned_model,
        {
            **scores,
            "weighted_loss_rel_svd": 0.0,
            "params_kept": float(counts["layers"]),
            "params_model": float(counts["model"]),
            "params_ratio_layers": 1.0,
            "params_ratio_model": 1.0,
            "size_on_disk_bytes": float(serialized_size_bytes(dense)),
            "latency_ms": latency_ms,
            "latency_dense_ms": latency_ms,
            "latency_ratio": 1.0,
            "factorization_seconds": 0.0,
        },
    )


def evaluate_compressed(
    compressed_model: ModelBundle,
    fine_tuned_model: ModelBundle,
    layer_report: pd.DataFrame,
    test_split: pd.DataFrame,
    model: ModelParams,
    evaluation: EvaluationParams,
) -> dict[str, Any]:
    """The record of one compressed model (as factorized, or refined after compression).

    The targeted layers are the model's ``LowRankLinear`` modules; latency is measured against
    the dense model in this process, the two timed in turns. ``layer_report`` is the solver's
    (a refined model keeps its solver's factorization): the weighted loss relative to SVD's and
    the factorization seconds come from it.
    """
    compressed = compressed_model.model.to("cpu")
    dense = fine_tuned_model.model.to("cpu")
    ranks = lowrank_ranks(compressed)
    counts = parameter_counts(tensors_for_saving(compressed)[0], ranks)
    dense_counts = parameter_counts(tensors_for_saving(dense)[0], ranks)
    timings = measure_latency_ms(
        {"dense": dense, "compressed": compressed},
        compressed.config.vocab_size,
        **evaluation.latency,
    )
    return evaluation_record(
        compressed_model,
        {
            **score_split(compressed_model, test_split, model.max_length, evaluation),
            "weighted_loss_rel_svd": relative_loss(
                float(layer_report["weighted_loss"].sum()), float(layer_report["svd_loss"].sum())
            ),
            "params_kept": float(counts["layers"]),
            "params_model": float(counts["model"]),
            "params_ratio_layers": counts["layers"] / dense_counts["layers"],
            "params_ratio_model": counts["model"] / dense_counts["model"],
            "size_on_disk_bytes": float(serialized_size_bytes(compressed)),
            "latency_ms": timings["compressed"],
            "latency_dense_ms": timings["dense"],
            "latency_ratio": timings["compressed"] / timings["dense"],
            "factorization_seconds": float(layer_report["total_seconds"].iloc[0]),
        },
    )
