"""Which fine-tuned model a dataset was made from: one fingerprint, written and read in one place.

Every dataset derived from a fine-tuned model carries that model's fingerprint
(:func:`~weighted_lowrank.lowrank.fingerprint.model_fingerprint`) in its own metadata:

* a :class:`~weighted_lowrank.hf.models.ModelBundle` in its ``model_fingerprint`` field (saved by
  ``HFModelDataset`` as ``lineage.json`` beside the weights); the fine-tuned model's is its own;
* a tensor file ``{"tensors", "metadata"}`` in its safetensors header metadata;
* a table in a ``model_fingerprint`` column;
* a JSON record under a top-level ``model_fingerprint`` key.

``hooks.LineageCheck`` reads the inputs of every node with :func:`fingerprint_of` and refuses to
run a node whose inputs come from different fine-tuned models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pandas as pd

from weighted_lowrank.hf.models import ModelBundle

#: The key (metadata entry, column, JSON field) that holds the fingerprint everywhere.
FINGERPRINT_KEY = "model_fingerprint"


def _is_tensor_file(data: Any) -> bool:
    return isinstance(data, Mapping) and "tensors" in data and "metadata" in data


def fingerprint_of(data: Any) -> str | None:
    """The fingerprint ``data`` carries, or None when it carries none (raw data, parameters).

    A table whose rows name more than one model is an error: it mixes runs.
    """
    if isinstance(data, ModelBundle):
        return data.model_fingerprint
    if isinstance(data, pd.DataFrame):
        if FINGERPRINT_KEY not in data.columns:
            return None
        values = sorted(set(data[FINGERPRINT_KEY].dropna()))
        if len(values) > 1:
            raise ValueError(f"a table mixes rows of several fine-tuned models {values}")
        return values[0] if values else None
    if _is_tensor_file(data):
        return (data.get("metadata") or {}).get(FINGERPRINT_KEY)
    if isinstance(data, Mapping):
        value = data.get(FINGERPRINT_KEY)
        return value if isinstance(value, str) else None
    return None


def with_fingerprint(data: Any, fingerprint: str | None) -> Any:
    """A copy of ``data`` that carries ``fingerprint`` (``data`` itself when it is None)."""
    if fingerprint is None:
        return data
    if isinstance(data, ModelBundle):
        return dataclasses.replace(data, model_fingerprint=fingerprint)
    if isinstance(data, pd.DataFrame):
        return data.assign(**{FINGERPRINT_KEY: fingerprint})
    if _is_tensor_file(data):
        return {**data, "metadata": {**(data.get("metadata") or {}), FINGERPRINT_KEY: fingerprint}}
    if isinstance(data, Mapping):
        return {**data, FINGERPRINT_KEY: fingerprint}
    raise TypeError(f"cannot record a model fingerprint on a {type(data).__name__}")


def disagreements(fingerprints: Mapping[str, str | None]) -> dict[str, str]:
    """The inputs whose fingerprint differs from the reference, ``{name: fingerprint}``.

    The reference is the fine-tuned model's own fingerprint when it is an input, else the most
    common one (ties: the first input). Inputs without a fingerprint never disagree.
    """
    known = {name: value for name, value in fingerprints.items() if value is not None}
    if len(set(known.values())) < 2:
        return {}
    reference = reference_fingerprint(known)
    return {name: value for name, value in known.items() if value != reference}


def reference_fingerprint(known: Mapping[str, str]) -> str:
    """The fingerprint the other inputs of a node are compared with (see :func:`disagreements`)."""
    if "fine_tuned_model" in known:
        return known["fine_tuned_model"]
    counts: dict[str, int] = {}
    for value in known.values():
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=lambda value: (counts[value], -list(known.values()).index(value)))
