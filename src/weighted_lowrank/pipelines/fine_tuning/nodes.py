"""Nodes of the ``fine_tuning`` pipeline."""

from __future__ import annotations

import pandas as pd
import torch

from weighted_lowrank.hf import ModelBundle, load_base_model
from weighted_lowrank.lineage import with_fingerprint
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.parameters import FineTuningParams, ModelParams
from weighted_lowrank.training import train_classifier


def initialise_model(model: ModelParams, label_names: list[str], seed: int) -> ModelBundle:
    """Load ``model.source`` with a fresh head sized to the labels (one output: regression).

    The head is drawn from ``seed`` without touching the caller's RNG state, so the same
    parameters give the same fine-tuned model run after run.
    """
    id2label = dict(enumerate(label_names)) if label_names else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_base_model(model.source, num_labels=len(label_names) or 1, id2label=id2label)


def fine_tune(
    base: ModelBundle,
    train_split: pd.DataFrame,
    validation_split: pd.DataFrame,
    model: ModelParams,
    fine_tuning: FineTuningParams,
    seed: int,
    device: str,
) -> tuple[ModelBundle, dict[str, list[dict[str, float]]]]:
    """Fine-tune the base model on the train split; validation metrics every epoch.

    The returned bundle carries its own fingerprint, the lineage every derived dataset copies;
    the metrics are an MLflow history (one step per epoch).
    """
    history = train_classifier(
        base.model,
        base.tokenizer,
        train_split,
        validation_split,
        fine_tuning.training_options(model.max_length, seed),
        device=resolve_device(device),
        progress=fine_tuning.progress,
    )
    base.model.to("cpu")
    metrics = {
        key: [{"value": float(record[key]), "step": int(record["epoch"])} for record in history]
        for key in history[0]
        if key != "epoch"
    }
    return with_fingerprint(base, model_fingerprint(base.model)), metrics
