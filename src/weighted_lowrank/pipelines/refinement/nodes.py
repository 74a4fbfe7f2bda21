"""Nodes of the ``refinement`` pipeline: fine-tune a compressed model on the train split.

The loop and its options are those of ``fine_tuning`` (:func:`~weighted_lowrank.training.
train_classifier`); ``trainable`` says whether every parameter is trained or only the low-rank
factors. With ``enabled: false`` the node hands the compressed model through untouched and records
that nothing was trained, so the pipeline graph is the same either way.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import pandas as pd

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fisher import model_fingerprint
from weighted_lowrank.lowrank.surgery import lowrank_modules
from weighted_lowrank.parameters import check_bool
from weighted_lowrank.training import TrainingOptions, check_split, train_classifier

TRAINABLE = ("all", "factors")
_CONTROL_KEYS = ("enabled", "trainable", "progress")


def check_refinement(refinement: dict[str, Any], max_length: int, seed: int) -> TrainingOptions:
    """Validate ``params:refinement``; returns the training options it describes.

    Raises ``ValueError`` naming the offending key (unknown keys included), so a bad value fails
    at the start of a run (see ``hooks.py``) rather than after factorization.
    """
    if not isinstance(refinement, dict):
        raise ValueError(f"parameters refinement={refinement!r}: expected a mapping")
    options = TrainingOptions.from_parameters(
        "refinement", refinement, max_length, seed, control_keys=_CONTROL_KEYS
    )
    check_bool("refinement.enabled", refinement.get("enabled", False))
    if refinement.get("trainable", "all") not in TRAINABLE:
        raise ValueError(
            f"parameter refinement.trainable={refinement['trainable']!r}: expected one of "
            f"{list(TRAINABLE)}"
        )
    return options


def refine(
    compressed_model: ModelBundle,
    train_split: pd.DataFrame,
    validation_split: pd.DataFrame,
    model: dict[str, Any],
    refinement: dict[str, Any],
    seed: int,
    device: str,
) -> tuple[ModelBundle, dict[str, Any]]:
    """Fine-tune ``compressed_model`` (all parameters or only its factors) when enabled.

    Returns a refined copy (the input itself when disabled) and a JSON-friendly record:
    ``enabled``, ``trainable``, the compressed model's fingerprint, the training options and one
    entry per epoch (train loss, validation metrics, seconds).
    """
    options = check_refinement(refinement, int(model["max_length"]), seed)
    enabled = bool(refinement.get("enabled", False))
    trainable = str(refinement.get("trainable", "all"))
    record: dict[str, Any] = {
        "enabled": enabled,
        "trainable": trainable,
        # Lets evaluation check that a refined model on disk was refined from this compressed one.
        "compressed_model_fingerprint": model_fingerprint(compressed_model.model),
        "epochs": [],
    }
    if not enabled:
        return compressed_model, record
    check_split(train_split, "train_split")
    check_split(validation_split, "validation_split")
    # A copy keeps the node pure: the compressed model may be shared in memory with evaluation.
    network = copy.deepcopy(compressed_model.model)
    factors = lowrank_modules(network)
    if not factors:
        raise ValueError(
            "compressed_model has no low-rank layers to refine; load a model written by the "
            "factorization pipeline"
        )
    factor_parameters = {id(p) for module in factors.values() for p in module.parameters()}
    frozen = [
        parameter
        for parameter in network.parameters()
        if trainable == "factors" and id(parameter) not in factor_parameters
    ]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        history = train_classifier(
            network,
            compressed_model.tokenizer,
            train_split,
            validation_split,
            options,
            device=resolve_device(device),
            progress=bool(refinement.get("progress", False)),
        )
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
        network.to("cpu")
    record.update(options=asdict(options), epochs=history)
    return ModelBundle(model=network, tokenizer=compressed_model.tokenizer), record
