"""Nodes of ``fisher_estimation``: pick the examples, then sum squared per-example gradients."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pandas as pd

from weighted_lowrank.batching import make_batches
from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lineage import with_fingerprint
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.fisher import empirical_fisher
from weighted_lowrank.parameters import FisherParams, ModelParams

logger = logging.getLogger(__name__)


def select_fisher_examples(
    train_split: pd.DataFrame, fisher_estimation: FisherParams, seed: int
) -> pd.DataFrame:
    """A seeded sample of ``num_examples`` training rows (all rows when null or more than exist)."""
    requested = fisher_estimation.num_examples
    if requested is None or requested >= len(train_split):
        if requested is not None and requested > len(train_split):
            logger.warning(
                "fisher_estimation.num_examples=%d exceeds the %d training rows; using all of them",
                requested,
                len(train_split),
            )
        return train_split.reset_index(drop=True)
    return train_split.sample(n=requested, random_state=seed).reset_index(drop=True)


def estimate_fisher(
    fine_tuned_model: ModelBundle,
    fisher_examples: pd.DataFrame,
    fisher_estimation: FisherParams,
    model: ModelParams,
    device: str,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Empirical Fisher of the targeted weights, as ``{"tensors", "metadata"}``, plus metrics.

    Metadata (strings, stored in the safetensors header): mode, num_examples, targets (JSON),
    batch_size, max_length, seconds, and the fine-tuned model's fingerprint (lineage). Metrics:
    seconds, num_examples, examples_per_second (MLflow, step 0).
    """
    batches = make_batches(
        fisher_examples,
        fine_tuned_model.tokenizer,
        batch_size=fisher_estimation.batch_size,
        max_length=model.max_length,
    )
    started = time.perf_counter()
    fisher = empirical_fisher(
        fine_tuned_model.model,
        batches,
        targets=fisher_estimation.targets,
        mode=fisher_estimation.mode,
        device=resolve_device(device),
        progress=fisher_estimation.progress,
    )
    seconds = time.perf_counter() - started
    examples = len(fisher_examples)
    logger.info(
        "Fisher (%s) over %d examples: %.1f s, %d tensors",
        fisher_estimation.mode,
        examples,
        seconds,
        len(fisher),
    )
    metadata = {
        "mode": fisher_estimation.mode,
        "num_examples": str(examples),
        "targets": json.dumps(fisher_estimation.targets),
        "batch_size": str(fisher_estimation.batch_size),
        "max_length": str(model.max_length),
        "seconds": f"{seconds:.3f}",
    }
    fisher_information = with_fingerprint(
        {"tensors": fisher, "metadata": metadata}, model_fingerprint(fine_tuned_model.model)
    )
    metrics = {
        "seconds": {"value": seconds, "step": 0},
        "num_examples": {"value": float(examples), "step": 0},
        "examples_per_second": {"value": examples / seconds if seconds > 0 else 0.0, "step": 0},
    }
    return fisher_information, metrics
