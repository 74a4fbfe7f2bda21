"""Nodes of the ``factorization`` pipeline."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lowrank.fisher import check_fisher_information
from weighted_lowrank.lowrank.surgery import compress_model

COMPRESSION_KEYS = ("budget", "targets", "seed", "device")


def _check_compression(compression: dict[str, Any]) -> None:
    unknown = sorted(set(compression) - set(COMPRESSION_KEYS))
    if unknown or "budget" not in compression:
        raise ValueError(
            f"parameters compression={compression!r}: expected keys {list(COMPRESSION_KEYS)} "
            f"with budget required; unknown {unknown}"
        )


def compress(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    compression: dict[str, Any],
    options: dict[str, Any] | None,
    *,
    solver: str,
) -> tuple[ModelBundle, pd.DataFrame]:
    """Factorize the targeted layers of the fine-tuned model with ``solver`` at the shared budget.

    ``options`` are the solver's own knobs (``<solver>.options``); ``compression.seed`` is the
    solver's seed unless the options set one. Returns the compressed bundle (same tokenizer) and
    the per-layer report (one row per layer, see ``compress_model``) with the budget added.
    """
    _check_compression(compression)
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"parameters {solver}.options={options!r}: expected a mapping or null")
    fisher, _, _ = check_fisher_information(fisher_information, fine_tuned_model.model)
    seed = int(compression.get("seed", 0))
    torch.manual_seed(seed)
    compressed, report = compress_model(
        fine_tuned_model.model,
        fisher,
        compression["budget"],
        solver,
        compression.get("targets"),
        device=compression.get("device", "cpu"),
        **{"seed": seed, **(options or {})},
    )
    table = pd.DataFrame(report)
    table.insert(1, "budget", float(compression["budget"]))
    return ModelBundle(model=compressed, tokenizer=fine_tuned_model.tokenizer), table
