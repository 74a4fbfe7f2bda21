"""Nodes of the ``fine_tuning`` pipeline."""

from __future__ import annotations

import pandas as pd
import torch

from weighted_lowrank.hf.models import ModelBundle, load_base_model
from weighted_lowrank.hf.training import evaluate_classifier, train_classifier
from weighted_lowrank.kedro_glue.lineage import with_fingerprint
from weighted_lowrank.kedro_glue.parameters import FineTuningParams, ModelParams
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint


def initialise_model(
    model: ModelParams, label_names: list[str], fine_tuning: FineTuningParams, seed: int
) -> ModelBundle:
    """Load ``model.source`` for the run's task: a classifier's head sized to the labels (one
    output: regression), fresh from ``seed`` (caller's RNG untouched) when fine-tuning is
    enabled, else the checkpoint's own."""
    task = model.resolved_task()
    id2label = dict(enumerate(label_names)) if label_names else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_base_model(
            model.source,
            num_labels=len(label_names) or 1,
            id2label=id2label,
            task=task,
            fresh_head=fine_tuning.enabled,
        )


def fine_tune(
    base: ModelBundle,
    train_split: pd.DataFrame,
    validation_split: pd.DataFrame,
    model: ModelParams,
    fine_tuning: FineTuningParams,
    seed: int,
    device: str,
) -> tuple[ModelBundle, dict[str, list[dict[str, float]]]]:
    """Fine-tune the base model (``enabled: false``: only score it, step 0); return it stamped
    with its own fingerprint and the validation metrics as an MLflow history."""
    options = fine_tuning.training_options(model.max_length, seed)
    target = resolve_device(device)
    if fine_tuning.enabled:
        history = train_classifier(
            base.model,
            base.tokenizer,
            train_split,
            validation_split,
            options,
            device=target,
            progress=fine_tuning.progress,
        )
    else:
        scores = evaluate_classifier(
            base.model,
            base.tokenizer,
            validation_split,
            options.max_length,
            options.eval_batch_size,
            target,
        )
        history = [{"epoch": 0, **{f"val_{key}": value for key, value in scores.items()}}]
    base.model.to("cpu").eval()
    metrics = {
        key: [{"value": float(record[key]), "step": int(record["epoch"])} for record in history]
        for key in history[0]
        if key != "epoch"
    }
    return with_fingerprint(base, model_fingerprint(base.model)), metrics
