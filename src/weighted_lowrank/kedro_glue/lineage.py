"""Which fine-tuned model, and which parameters, a dataset was made from: written and read here.

The model's fingerprint travels in a dataset's own metadata (a ``ModelBundle`` field saved as
``lineage.json``, tensor-file header metadata, a table column, a JSON record key); a node's
outputs are stamped with the values of the ``params:`` it read (:func:`parameters_read`), in
table ``attrs`` (kept by Parquet) or tensor-file metadata. ``hooks.LineageCheck`` reads both.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial, update_wrapper
from typing import Any

import pandas as pd

from weighted_lowrank.hf.models import ModelBundle

#: The key (metadata entry, column, JSON field) that holds the fingerprint everywhere.
FINGERPRINT_KEY = "model_fingerprint"
#: The key (table attrs, tensor-file metadata) of ``{"node": name, "parameters": {key: JSON}}``.
PARAMETERS_KEY = "made_under"
#: Parameter names (last part of the key) that change what a run shows, never what it makes.
DISPLAY_ONLY = frozenset({"progress"})


def _is_tensor_file(data: Any) -> bool:
    return isinstance(data, Mapping) and "tensors" in data and "metadata" in data


def _with_metadata(data: Mapping[str, Any], key: str, value: str) -> dict[str, Any]:
    """A tensor file ``data`` with ``key: value`` added to its header metadata."""
    return {**data, "metadata": {**(data.get("metadata") or {}), key: value}}


def fingerprint_of(data: Any) -> str | None:
    """The fingerprint ``data`` carries, or None (raw data, parameters); a table whose rows name
    more than one model mixes runs: an error."""
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
        return _with_metadata(data, FINGERPRINT_KEY, fingerprint)
    if isinstance(data, Mapping):
        return {**data, FINGERPRINT_KEY: fingerprint}
    raise TypeError(f"cannot record a model fingerprint on a {type(data).__name__}")


def reference_fingerprint(fingerprints: Mapping[str, str]) -> str | None:
    """The fingerprint a node's inputs ``{name: fingerprint}`` should share: the fine-tuned
    model's own when it is an input, else the most common (ties: the first input)."""
    if "fine_tuned_model" in fingerprints:
        return fingerprints["fine_tuned_model"]
    counts = Counter(fingerprints.values()).most_common(1)  # ties: the first in insertion order
    return counts[0][0] if counts else None


def independent_of(function: Callable, *keys: str) -> Callable:
    """``function`` as a node whose outputs do not depend on the parameter ``keys`` (dotted,
    e.g. ``compression.budget``) of the blocks it reads: they are left out of its stamp."""
    wrapped = update_wrapper(partial(function), function)
    wrapped.independent_of = frozenset(keys)
    return wrapped


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """``{dotted key: JSON of the value}`` of every leaf of a parameter value (mappings, Pydantic
    models and dataclasses nest; an empty mapping has no leaf)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {
            key: text
            for name, item in value.items()
            for key, text in flatten(f"{prefix}.{name}", item).items()
        }
    return {prefix: json.dumps(value, sort_keys=True, default=str)}


def _relevant(values: Mapping[str, str], read: list[str], ignored: list[str]) -> dict[str, str]:
    """The entries of ``values`` under the blocks ``read``, less ``ignored`` and display keys."""
    return {
        key: text
        for key, text in values.items()
        if any(key == block or key.startswith(f"{block}.") for block in read)
        and key not in ignored
        and key.rpartition(".")[2] not in DISPLAY_ONLY
    }


def parameters_read(node_name: str, function: Any, inputs: Mapping[str, Any]) -> str:
    """The JSON stamp of a node's outputs: its name, the blocks it read, the keys it declares
    :func:`independent_of` and the values of the others."""
    read = sorted(name.removeprefix("params:") for name in inputs if name.startswith("params:"))
    ignored = sorted(getattr(function, "independent_of", ()))
    values = {
        key: text
        for block in read
        for key, text in flatten(block, inputs[f"params:{block}"]).items()
    }
    stamp = {"node": node_name, "read": read, "ignored": ignored}
    return json.dumps({**stamp, "parameters": _relevant(values, read, ignored)}, sort_keys=True)


def with_parameters(data: Any, stamp: str) -> Any:
    """A table or tensor file ``data`` stamped with ``stamp``; any other output as it is."""
    if isinstance(data, pd.DataFrame):
        stamped = data.copy(deep=False)
        stamped.attrs = {**data.attrs, PARAMETERS_KEY: stamp}
        return stamped
    if _is_tensor_file(data):
        return _with_metadata(data, PARAMETERS_KEY, stamp)
    return data


def parameter_differences(
    data: Any, current: Mapping[str, str]
) -> tuple[str, dict[str, tuple[str | None, str | None]]] | None:
    """``(producing node, {key: (value when made, value now)})`` (None: unset) for a stamped
    ``data`` made under other parameter values than ``current`` (:func:`flatten` of the run's
    parameters); None when it carries no stamp or agrees."""
    if isinstance(data, pd.DataFrame):
        stamp = data.attrs.get(PARAMETERS_KEY)
    elif _is_tensor_file(data):
        stamp = (data.get("metadata") or {}).get(PARAMETERS_KEY)
    else:
        return None
    if not stamp:
        return None
    made = json.loads(stamp)
    now = _relevant(current, made["read"], made["ignored"])
    differing = {
        key: (made["parameters"].get(key), now.get(key))
        for key in {*made["parameters"], *now}
        if made["parameters"].get(key) != now.get(key)
    }
    return (made["node"], differing) if differing else None
