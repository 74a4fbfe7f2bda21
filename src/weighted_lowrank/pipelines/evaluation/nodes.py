"""Nodes of the ``evaluation`` pipeline: task metrics, parameter counts, size, latency.

Every namespace (``dense`` and one per solver) returns a flat ``{name: float}`` with the same keys:
the task metrics (accuracy, f1, mcc for classification; pearson, spearman for regression),
test_loss, weighted_loss_rel_svd, params_kept, params_model, params_ratio_layers,
params_ratio_model, size_on_disk_bytes, latency_ms, latency_dense_ms, latency_ratio,
factorization_seconds. With ``refinement.enabled`` every namespace also has ``<task metric>_refined``
and ``test_loss_refined`` (the model fine-tuned after compression; for ``dense``, which is not
compressed, the same values as without the suffix) and ``refinement_seconds``.

Parameter counts are element counts of the tensors ``save_compressed`` writes
(:func:`~weighted_lowrank.lowrank.surgery.tensors_for_saving`: the state dict, tied tensors once);
for a model reloaded by ``load_compressed`` these are exactly the tensors of its
``model.safetensors`` (the load is strict). "layers" counts the targeted layers (weights and
biases), "model" every tensor. ``size_on_disk_bytes`` is the exact size of that
``model.safetensors``, serialized in memory.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.latency import measure_latency_ms
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fisher import model_fingerprint
from weighted_lowrank.lowrank.objective import relative_loss
from weighted_lowrank.lowrank.surgery import (
    lowrank_ranks,
    parameter_counts,
    serialized_size_bytes,
    tensors_for_saving,
)
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.parameters import check_keys, check_positive_int
from weighted_lowrank.training import check_split, predict, task_metrics

LATENCY_KEYS = ("batch_size", "sequence_length", "repeats", "warmup", "threads", "seed")
EVALUATION_KEYS = ("batch_size", "device", "latency")


def _check_evaluation(evaluation: dict[str, Any]) -> dict[str, Any]:
    check_keys("evaluation", evaluation, EVALUATION_KEYS)
    latency = evaluation.get("latency")
    if not isinstance(latency, dict):
        raise ValueError(f"parameter evaluation.latency={latency!r}: expected a mapping")
    for key in ("batch_size", "sequence_length", "repeats"):
        check_positive_int(f"evaluation.latency.{key}", latency.get(key))
    check_keys("evaluation.latency", latency, LATENCY_KEYS)
    return latency


def score_split(
    bundle: ModelBundle, test_split: pd.DataFrame, max_length: int, evaluation: dict[str, Any]
) -> dict[str, float]:
    """Task metrics and ``test_loss`` of ``bundle`` on a split (model left on the CPU)."""
    device = resolve_device(str(evaluation.get("device", "cpu")))
    logits, loss = predict(
        bundle.model,
        bundle.tokenizer,
        test_split,
        max_length,
        batch_size=int(evaluation.get("batch_size", 128)),
        device=device,
    )
    bundle.model.to("cpu")
    return {**task_metrics(logits, test_split["label"].to_numpy()), "test_loss": float(loss)}


def _refined_metrics(metrics: dict[str, float], refinement_seconds: float) -> dict[str, float]:
    refined = {f"{key}_refined": value for key, value in metrics.items()}
    return {**refined, "refinement_seconds": refinement_seconds}


def _check_refined(
    refined_model: ModelBundle,
    refinement_history: dict[str, Any],
    compressed: torch.nn.Module,
    ranks: dict[str, int],
) -> float:
    """Seconds the refinement took; raises if the refined model does not belong to this run."""
    history = refinement_history if isinstance(refinement_history, dict) else {}
    epochs = history.get("epochs")
    if not (history.get("enabled") and epochs):
        raise ValueError(
            "refinement.enabled is true but refinement_history records no training; run the "
            "refinement pipeline with refinement.enabled=true before evaluation"
        )
    if history.get("compressed_model_fingerprint") != model_fingerprint(compressed):
        raise ValueError(
            "refined_model was refined from another compressed_model than the one evaluated "
            "(refinement_history's fingerprint differs); rerun refinement or load matching versions"
        )
    refined_ranks = lowrank_ranks(refined_model.model)
    if refined_ranks != ranks:
        raise ValueError(
            "refined_model's low-rank modules and ranks differ from compressed_model's "
            f"({len(refined_ranks)} vs {len(ranks)} layers); load matching versions"
        )
    return float(epochs[-1]["seconds"])


def evaluate_dense(
    fine_tuned_model: ModelBundle,
    test_split: pd.DataFrame,
    model: dict[str, Any],
    evaluation: dict[str, Any],
    compression: dict[str, Any],
    refinement: dict[str, Any],
) -> dict[str, float]:
    """Metrics of the dense fine-tuned model, with the same keys as :func:`evaluate_compressed`.

    Its targeted layers are those ``compression.targets`` selects; ratios are 1, its weighted loss
    relative to SVD 0 (nothing is approximated), its factorization and refinement times 0.
    """
    latency = _check_evaluation(evaluation)
    check_split(test_split, "test_split")
    dense = fine_tuned_model.model.to("cpu")
    layers = list(select_linear_modules(dense, compression.get("targets")))
    counts = parameter_counts(tensors_for_saving(dense)[0], layers)
    latency_ms = measure_latency_ms({"dense": dense}, dense.config.vocab_size, **latency)["dense"]
    scores = score_split(fine_tuned_model, test_split, int(model["max_length"]), evaluation)
    refined = _refined_metrics(scores, 0.0) if refinement.get("enabled") else {}
    return {
        **scores,
        **refined,
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
    }


def evaluate_compressed(
    compressed_model: ModelBundle,
    fine_tuned_model: ModelBundle,
    layer_report: pd.DataFrame,
    test_split: pd.DataFrame,
    model: dict[str, Any],
    evaluation: dict[str, Any],
    refined_model: ModelBundle,
    refinement_history: dict[str, Any],
    refinement: dict[str, Any],
) -> dict[str, float]:
    """Metrics of one compressed model; latency measured against the dense model in this process.

    The targeted layers are the compressed model's ``LowRankLinear`` modules, which must be the
    layer report's modules with the report's ranks (else the two come from different runs). With
    ``refinement.enabled`` the refined model (same modules and ranks) is scored too.
    """
    latency = _check_evaluation(evaluation)
    check_split(test_split, "test_split")
    compressed = compressed_model.model.to("cpu")
    dense = fine_tuned_model.model.to("cpu")
    ranks = lowrank_ranks(compressed)
    reported = dict(zip(layer_report["module"], layer_report["rank"].astype(int), strict=True))
    if ranks != reported:
        raise ValueError(
            "compressed_model's low-rank modules and ranks differ from its layer_report "
            f"(model has {len(ranks)} layers, report {len(reported)}); load matching versions"
        )
    refined = {}
    if refinement.get("enabled"):
        seconds = _check_refined(refined_model, refinement_history, compressed, ranks)
        refined_scores = score_split(
            refined_model, test_split, int(model["max_length"]), evaluation
        )
        refined = _refined_metrics(refined_scores, seconds)
    counts = parameter_counts(tensors_for_saving(compressed)[0], ranks)
    dense_counts = parameter_counts(tensors_for_saving(dense)[0], ranks)
    timings = measure_latency_ms(
        {"dense": dense, "compressed": compressed},
        compressed.config.vocab_size,
        **latency,
    )
    return {
        **score_split(compressed_model, test_split, int(model["max_length"]), evaluation),
        **refined,
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
    }
