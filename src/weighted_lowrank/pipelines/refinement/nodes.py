"""Nodes of the ``refinement`` pipeline: fine-tune a compressed model on the train split with
``fine_tuning``'s loop, every parameter or only the low-rank factors (``trainable``)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pandas as pd

from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.hf.training import train_classifier
from weighted_lowrank.kedro_glue.lineage import with_fingerprint
from weighted_lowrank.kedro_glue.parameters import ModelParams, RefinementParams
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.layer import lowrank_modules


def refine(
    compressed_model: ModelBundle,
    train_split: pd.DataFrame,
    validation_split: pd.DataFrame,
    model: ModelParams,
    refinement: RefinementParams,
    seed: int,
    device: str,
) -> tuple[ModelBundle, dict[str, Any]]:
    """Fine-tune a copy of ``compressed_model``; return it (same tokenizer and lineage) and a
    record of what was trained and how, one entry per epoch, stamped with the lineage."""
    network = copy.deepcopy(compressed_model.model)
    factors = lowrank_modules(network)
    if not factors:
        raise ValueError(
            "compressed_model has no low-rank layers to refine; load a model written by the "
            "factorization pipeline"
        )
    options = refinement.training_options(model.max_length, seed)
    factor_parameters = {id(p) for module in factors.values() for p in module.parameters()}
    frozen = [
        parameter
        for parameter in network.parameters()
        if refinement.trainable == "factors" and id(parameter) not in factor_parameters
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
            progress=refinement.progress,
        )
    finally:
        # The refined model is saved and evaluated as a whole: nothing stays frozen.
        for parameter in frozen:
            parameter.requires_grad_(True)
        network.to("cpu")
    record = {
        "refinement": refinement.describe(),
        "trainable": refinement.trainable,
        "options": dataclasses.asdict(options),
        "epochs": history,
    }
    refined = dataclasses.replace(compressed_model, model=network)
    return refined, with_fingerprint(record, compressed_model.model_fingerprint)
