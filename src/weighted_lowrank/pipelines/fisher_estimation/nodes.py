"""Nodes of ``fisher_estimation``: pick the examples, then one pass for the Fisher and the
calibration statistics."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pandas as pd

from weighted_lowrank.hf.batching import make_batches, make_lm_batches
from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.kedro_glue.lineage import with_fingerprint
from weighted_lowrank.kedro_glue.parameters import FisherParams, ModelParams
from weighted_lowrank.lowrank.calibration import NORMALISATION
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.fisher import Calibration, calibrate
from weighted_lowrank.lowrank.language_model import is_causal_lm

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
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, float]]]:
    """Empirical Fisher and calibration statistics of the targeted weights from one pass, each
    ``{"tensors", "metadata"}`` stamped with the fine-tuned model's fingerprint (metadata: strings
    in the safetensors header), and the pass's timings as MLflow metrics."""
    batch_size = fisher_estimation.batch_size
    batches = _batches(fine_tuned_model, fisher_examples, batch_size, model.max_length)
    started = time.perf_counter()
    found = calibrate(
        fine_tuned_model.model,
        batches,
        targets=fisher_estimation.targets,
        mode=fisher_estimation.mode,
        statistics=fisher_estimation.statistics,
        device=resolve_device(device),
        progress=fisher_estimation.progress,
    )
    seconds = time.perf_counter() - started
    logger.info(
        "Fisher (%s) over %d examples: %.1f s, %d tensors; statistics %s: %.1f s",
        fisher_estimation.mode,
        found.num_examples,
        seconds,
        len(found.fisher),
        list(fisher_estimation.statistics),
        found.statistics_seconds,
    )
    metadata = {
        "mode": fisher_estimation.mode,
        "num_examples": str(found.num_examples),
        "targets": json.dumps(fisher_estimation.targets),
        "batch_size": str(fisher_estimation.batch_size),
        "max_length": str(model.max_length),
        "seconds": f"{seconds:.3f}",
    }
    fingerprint = model_fingerprint(fine_tuned_model.model)
    statistics = _statistics_metadata(found, fisher_estimation.statistics, metadata)
    return (
        with_fingerprint({"tensors": found.fisher, "metadata": metadata}, fingerprint),
        with_fingerprint({"tensors": found.statistics, "metadata": statistics}, fingerprint),
        _metrics(found, seconds),
    )


def _batches(
    bundle: ModelBundle, examples: pd.DataFrame, batch_size: int, max_length: int
) -> list[dict[str, Any]]:
    """The Fisher pass's batches: a language model's are the token blocks of the documents."""
    if is_causal_lm(bundle.model):
        return make_lm_batches(
            examples, bundle.tokenizer, batch_size=batch_size, block_length=max_length
        )
    return make_batches(examples, bundle.tokenizer, batch_size=batch_size, max_length=max_length)


def _metrics(found: Calibration, seconds: float) -> dict[str, dict[str, float]]:
    values = {
        "seconds": seconds,
        "num_examples": float(found.num_examples),
        "examples_per_second": found.num_examples / seconds if seconds > 0 else 0.0,
        "statistics_seconds": found.statistics_seconds,
        "statistics_share": found.statistics_seconds / seconds if seconds > 0 else 0.0,
    }
    return {name: {"value": value, "step": 0} for name, value in values.items()}


def _statistics_metadata(
    found: Calibration, statistics: tuple[str, ...], fisher_metadata: dict[str, str]
) -> dict[str, str]:
    metadata = {
        **fisher_metadata,
        "statistics": json.dumps(list(statistics)),
        "num_tokens": str(found.num_tokens),
        "normalisation": NORMALISATION,
        "statistics_seconds": f"{found.statistics_seconds:.3f}",
    }
    if any(tokens != found.num_tokens for tokens in found.module_tokens.values()):
        metadata["module_tokens"] = json.dumps(found.module_tokens)
    return metadata


def recorded_num_examples(metadata: dict[str, str]) -> int | None:
    """The number of examples a saved Fisher sums over (its metadata ``num_examples``), if any."""
    if "num_examples" not in metadata:
        return None
    try:
        count = int(metadata["num_examples"])
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"fisher_information metadata 'num_examples' is not an integer: "
            f"{metadata['num_examples']!r}"
        ) from exc
    if count < 1:
        raise ValueError(f"fisher_information metadata 'num_examples' is {count}; expected ≥ 1")
    return count
