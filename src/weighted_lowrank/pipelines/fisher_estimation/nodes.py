"""Nodes of ``fisher_estimation``: pick the examples, then sum squared per-example gradients."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pandas as pd

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lowrank.batching import make_batches
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fisher import FISHER_MODES, empirical_fisher, model_fingerprint
from weighted_lowrank.parameters import check_positive_int
from weighted_lowrank.training import check_split

logger = logging.getLogger(__name__)


def select_fisher_examples(
    train_split: pd.DataFrame, fisher_estimation: dict[str, Any], seed: int
) -> pd.DataFrame:
    """A seeded sample of ``num_examples`` training rows (all rows when null or more than exist)."""
    check_split(train_split, "train_split")
    requested = fisher_estimation.get("num_examples")
    check_positive_int("fisher_estimation.num_examples", requested, allow_none=True)
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
    fisher_estimation: dict[str, Any],
    model: dict[str, Any],
    device: str,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Empirical Fisher of the targeted weights, as ``{"tensors", "metadata"}``, plus metrics.

    Metadata (strings, stored in the safetensors header): mode, num_examples, model_fingerprint,
    targets (JSON), batch_size, max_length, seconds. Metrics: seconds, num_examples,
    examples_per_second (MLflow, step 0).
    """
    mode = fisher_estimation.get("mode", "per_example")
    if mode not in FISHER_MODES:
        raise ValueError(f"fisher_estimation.mode {mode!r} is not one of {FISHER_MODES}")
    batch_size = fisher_estimation.get("batch_size", 32)
    check_positive_int("fisher_estimation.batch_size", batch_size)
    targets = fisher_estimation.get("targets")
    batches = make_batches(
        fisher_examples,
        fine_tuned_model.tokenizer,
        batch_size=batch_size,
        max_length=model["max_length"],
    )
    started = time.perf_counter()
    fisher = empirical_fisher(
        fine_tuned_model.model,
        batches,
        targets=targets,
        mode=mode,
        device=resolve_device(device),
        progress=bool(fisher_estimation.get("progress", True)),
    )
    seconds = time.perf_counter() - started
    examples = len(fisher_examples)
    logger.info(
        "Fisher (%s) over %d examples: %.1f s, %d tensors", mode, examples, seconds, len(fisher)
    )
    metadata = {
        "mode": mode,
        "num_examples": str(examples),
        "model_fingerprint": model_fingerprint(fine_tuned_model.model),
        "targets": json.dumps(targets),
        "batch_size": str(batch_size),
        "max_length": str(model["max_length"]),
        "seconds": f"{seconds:.3f}",
    }
    metrics = {
        "seconds": {"value": seconds, "step": 0},
        "num_examples": {"value": float(examples), "step": 0},
        "examples_per_second": {"value": examples / seconds if seconds > 0 else 0.0, "step": 0},
    }
    return {"tensors": fisher, "metadata": metadata}, metrics
