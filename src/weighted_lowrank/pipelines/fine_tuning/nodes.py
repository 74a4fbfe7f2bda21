"""Nodes of the ``fine_tuning`` pipeline."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from weighted_lowrank.hf import ModelBundle, load_base_model
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.training import TrainingOptions, check_split, train_classifier


def initialise_model(model: dict[str, Any], label_names: list[str], seed: int) -> ModelBundle:
    """Load the base model named by ``model.source`` with a fresh head sized to the labels.

    An empty ``label_names`` means a regression task (one output). The new head's random
    initialisation is drawn from ``seed`` (without touching the caller's RNG state), so the same
    parameters give the same fine-tuned model run after run.
    """
    source = model.get("source")
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"parameter model.source={source!r}: expected a model directory, hub name or 'embedded:…'"
        )
    id2label = dict(enumerate(label_names)) if label_names else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return load_base_model(source, num_labels=len(label_names) or 1, id2label=id2label)


def fine_tune(
    base: ModelBundle,
    train_split: pd.DataFrame,
    validation_split: pd.DataFrame,
    model: dict[str, Any],
    fine_tuning: dict[str, Any],
    seed: int,
    device: str,
) -> tuple[ModelBundle, dict[str, list[dict[str, float]]]]:
    """Fine-tune the base model on the train split; validation metrics every epoch.

    Returns the fine-tuned bundle and an MLflow metrics-history dict (one step per epoch).
    """
    training = TrainingOptions.from_parameters(
        "fine_tuning", fine_tuning, int(model["max_length"]), seed, control_keys=("progress",)
    )
    check_split(train_split, "train_split")
    check_split(validation_split, "validation_split")
    history = train_classifier(
        base.model,
        base.tokenizer,
        train_split,
        validation_split,
        training,
        device=resolve_device(device),
        progress=bool(fine_tuning.get("progress", True)),
    )
    base.model.to("cpu")
    metrics = {
        key: [{"value": float(record[key]), "step": int(record["epoch"])} for record in history]
        for key in history[0]
        if key != "epoch"
    }
    return base, metrics
