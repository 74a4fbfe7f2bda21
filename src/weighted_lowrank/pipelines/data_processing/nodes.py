"""Nodes of the data_processing pipeline: pick a source, clean, encode labels, split.

Every split has ``text``, optionally ``text_pair``, and ``label`` (int ``0..k-1``, or float for
regression, whose ``label_names`` are empty). A causal language model's corpus (``model.task:
causal_lm``) has ``text`` alone, split at random without strata.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from weighted_lowrank.hf.text_files import jsonl_records, read_text, text_lines
from weighted_lowrank.kedro_glue.parameters import DataParams, ModelParams, SplitParams, label_key

SPLIT_NAMES = ("train", "validation", "test")
_REGRESSION_STRATA = 5

#: GLUE tasks with labels: (text column, text-pair column, label names by id; None = regression).
GLUE_TASKS: dict[str, tuple[str, str | None, list[str] | None]] = {
    "cola": ("sentence", None, ["unacceptable", "acceptable"]),
    "sst2": ("sentence", None, ["negative", "positive"]),
    "mrpc": ("sentence1", "sentence2", ["not_equivalent", "equivalent"]),
    "qqp": ("question1", "question2", ["not_duplicate", "duplicate"]),
    "stsb": ("sentence1", "sentence2", None),
    "mnli": ("premise", "hypothesis", ["entailment", "neutral", "contradiction"]),
    "qnli": ("question", "sentence", ["entailment", "not_entailment"]),
    "rte": ("sentence1", "sentence2", ["entailment", "not_entailment"]),
    "wnli": ("sentence1", "sentence2", ["not_entailment", "entailment"]),
}
#: Labelled GLUE splits pooled before our own split (GLUE's test labels are hidden, -1).
_GLUE_LABELLED_SPLITS = {"mnli": ["train", "validation_matched", "validation_mismatched"]}
_FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
}


def resolve_source(data: DataParams, model: ModelParams | None = None) -> dict[str, Any]:
    """The chosen source as one flat description the later nodes read, whatever its kind, with
    ``model_task`` (the run's ``model.task`` resolved; without ``model``, classification)."""
    spec = _resolve_labelled_source(data)
    spec["model_task"] = "sequence_classification" if model is None else model.resolved_task()
    if spec["type"] == "text" and spec["model_task"] != "causal_lm":
        raise ValueError(
            f"data.source=text is a corpus without labels, for model.task=causal_lm, but this "
            f"run's model task is {spec['model_task']!r}: give a csv, jsonl or parquet file with "
            "a label column (data.local_file.label_column), or set model.task=causal_lm"
        )
    return spec


def _resolve_labelled_source(data: DataParams) -> dict[str, Any]:
    if data.source == "glue":
        return _resolve_glue(data)
    block = data.catalog if data.source == "catalog" else data.local_file
    spec = {"type": data.source, "read_args": {}, **block.model_dump()}
    if data.source == "text":  # one document per line, read into `text`; there are no labels
        unlabelled = ("text_pair_column", "label_column", "label_values", "label_names")
        spec.update(dict.fromkeys(unlabelled), text_column="text")
    return spec


def _resolve_glue(data: DataParams) -> dict[str, Any]:
    """GLUE's own columns and label names for the task (checked before any download)."""
    glue = data.glue
    task = glue.task.lower().replace("-", "")
    if task not in GLUE_TASKS:
        raise ValueError(f"data.glue.task is {glue.task!r}; expected one of {sorted(GLUE_TASKS)}")
    text_column, pair_column, names = GLUE_TASKS[task]
    return {
        "type": "glue",
        "task": task,
        **glue.model_dump(exclude={"task"}),
        "text_column": text_column,
        "text_pair_column": pair_column,
        "label_column": "label",
        "label_values": None if names is None else list(range(len(names))),
        "label_names": names,
        "task_type": "regression" if names is None else "classification",
        "read_args": {},
        "unescape_html": False,
    }


def load_source_records(reviews_raw: pd.DataFrame, source: dict[str, Any]) -> pd.DataFrame:
    """The source's rows with columns ``text``[, ``text_pair``], ``label``: ``reviews_raw`` for
    a ``catalog`` source; files and GLUE tasks are read here (which one is a parameter)."""
    if source["type"] == "catalog":
        frame, origin = reviews_raw, "catalog entry reviews_raw"
    elif source["type"] == "glue":
        frame, origin = _read_glue(source), f"GLUE task {source['task']!r}"
    else:
        frame, origin = _read_local_file(source), f"file {source['path']!r}"
    if len(frame) == 0:
        raise ValueError(f"the {origin} has no rows")
    columns = {"text": source["text_column"]}
    if not _is_corpus(source):  # a language model reads the texts alone
        if source["text_pair_column"]:
            columns["text_pair"] = source["text_pair_column"]
        columns["label"] = source["label_column"]
    missing = [name for name in columns.values() if name not in frame.columns]
    if missing:
        raise ValueError(
            f"the {origin} lacks the configured column(s) {missing}; "
            f"it has {[str(column) for column in frame.columns]}"
        )
    records = frame[list(columns.values())].copy()
    records.columns = list(columns)
    return records.reset_index(drop=True)


def _read_local_file(source: dict[str, Any]) -> pd.DataFrame:
    """The table of a local file; text formats decoded with the source's ``encoding``."""
    path = Path(source["path"]).expanduser()
    if not path.is_file():
        raise ValueError(f"data.local_file.path {str(path)!r} does not exist or is not a file")
    if source["type"] == "parquet":
        return pd.read_parquet(path, **source["read_args"])
    read_args = dict(source["read_args"])
    text, _ = read_text(path, source["encoding"], read_args.pop("compression", "infer"))
    if source["type"] == "jsonl":
        return pd.DataFrame(jsonl_records(text, path))
    if source["type"] == "text":
        return pd.DataFrame({"text": text_lines(text)}, dtype=object)
    if path.suffix == ".tsv":
        read_args.setdefault("sep", "\t")
    return pd.read_csv(io.StringIO(text), **read_args)


def _read_glue(source: dict[str, Any]) -> pd.DataFrame:
    import datasets

    data_files = source["data_files"]
    if data_files:
        builder, data_files = _local_data_files(data_files)
        kwargs: dict[str, Any] = {"data_files": data_files, "cache_dir": source["cache_dir"]}
        tsv = all(Path(p).suffix.lower() == ".tsv" for p in _paths(data_files))
        if builder == "csv" and tsv:
            kwargs["delimiter"] = "\t"
        loaded = datasets.load_dataset(builder, **kwargs)
        default_splits = list(loaded)
    else:
        try:
            loaded = datasets.load_dataset(
                "nyu-mll/glue", source["task"], cache_dir=source["cache_dir"]
            )
        except Exception as exc:
            exc.add_note(
                "GLUE is read from the Hugging Face hub: this needs the network (HF_HUB_OFFLINE "
                "unset) or a warm cache; offline, point data.glue.data_files at local copies"
            )
            raise
        default_splits = _GLUE_LABELLED_SPLITS.get(source["task"], ["train", "validation"])
    splits = source["splits"] or default_splits
    unknown = [split for split in splits if split not in loaded]
    if unknown:
        raise ValueError(f"data.glue.splits {unknown} not found; available: {list(loaded)}")
    return pd.concat([loaded[split].to_pandas() for split in splits], ignore_index=True)


def _local_data_files(data_files: Any) -> tuple[str, Any]:
    """Check local GLUE files exist and pick the ``datasets`` builder from their suffix."""
    if not isinstance(data_files, str | list | tuple | dict):
        raise ValueError(
            f"data.glue.data_files must be a path, a list or a {{split: path}} dict, got {data_files!r}"
        )
    paths = _paths(data_files)
    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise ValueError(f"data.glue.data_files: file(s) {missing} do not exist")
    builders = {_FILE_BUILDERS.get(Path(p).suffix.lower()) for p in paths}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"data.glue.data_files must all be one of {sorted(_FILE_BUILDERS)} (same kind), got {paths}"
        )
    return builders.pop(), dict(data_files) if isinstance(data_files, dict) else paths


def _paths(data_files: str | list | tuple | dict) -> list[str]:
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    return [p for value in values for p in ([value] if isinstance(value, str) else value)]


def clean_records(records: pd.DataFrame, source: dict[str, Any]) -> pd.DataFrame:
    """Drop missing or empty texts/labels, labels outside ``label_values``, texts seen with
    different labels, and later duplicates of a (text, text_pair); HTML entities decoded first
    when the source sets ``unescape_html``."""
    text_columns = [column for column in ("text", "text_pair") if column in records.columns]
    labelled = "label" in records.columns
    cleaned = records.dropna(subset=[*text_columns, *(["label"] if labelled else [])]).copy()
    for column in text_columns:
        cleaned[column] = cleaned[column].astype(str)
        if source["unescape_html"]:
            cleaned[column] = cleaned[column].map(html.unescape)
        cleaned[column] = cleaned[column].str.strip()
        cleaned = cleaned[cleaned[column] != ""]
    if not labelled:
        cleaned = cleaned.drop_duplicates(subset=text_columns, keep="first")
        if len(cleaned) == 0:
            raise ValueError(f"no non-empty texts left after cleaning {len(records)} rows")
        return cleaned.reset_index(drop=True)
    if source["task_type"] == "regression":
        cleaned["label"] = pd.to_numeric(cleaned["label"], errors="coerce")
        cleaned = cleaned.dropna(subset=["label"])
    elif source["label_values"] is not None:
        wanted = {label_key(value) for value in source["label_values"]}
        cleaned = cleaned[cleaned["label"].map(label_key).isin(wanted)]
    if source["task_type"] == "classification":
        label_keys = cleaned["label"].map(label_key)
        labels_per_text = label_keys.groupby([cleaned[c] for c in text_columns]).transform(
            "nunique"
        )
        cleaned = cleaned[labels_per_text == 1]
    cleaned = cleaned.drop_duplicates(subset=text_columns, keep="first")
    if len(cleaned) == 0:
        raise ValueError(
            f"no usable rows left after cleaning {len(records)} rows (missing texts/labels, or "
            f"labels outside label_values={source['label_values']!r})"
        )
    return cleaned.reset_index(drop=True)


def encode_labels(records: pd.DataFrame, source: dict[str, Any]) -> tuple[pd.DataFrame, list[str]]:
    """Map raw labels to ids ``0..k-1`` in the configured order (else sorted); return the data
    and label names (none for a regression target, float32, nor a corpus)."""
    encoded = records.copy()
    if _is_corpus(source):
        return encoded, []
    if source["task_type"] == "regression":
        if encoded["label"].nunique() < 2:
            raise ValueError(
                f"the regression target is constant ({encoded['label'].iloc[0]!r}) after cleaning"
            )
        encoded["label"] = encoded["label"].astype("float32")
        return encoded, []
    values = source["label_values"]
    if values is None:
        values = sorted(encoded["label"].unique().tolist(), key=_sort_key)
    names = [str(name) for name in (source["label_names"] or values)]
    ids = {label_key(value): index for index, value in enumerate(values)}
    encoded["label"] = encoded["label"].map(label_key).map(ids).astype("int64")
    present = sorted(encoded["label"].unique().tolist())
    if len(present) < 2:
        only = names[present[0]] if present else None
        raise ValueError(
            f"only one class ({only!r}) is left after cleaning; classification needs at least two"
        )
    absent = [names[index] for index in range(len(names)) if index not in present]
    if absent:
        raise ValueError(f"configured label(s) {absent} have no rows after cleaning; remove them")
    return encoded, names


def split_records(
    records: pd.DataFrame, data: DataParams, label_names: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Seeded train/validation/test split of ``data.split``'s sizes, each keeping every class
    (regression: quantile bin of the target) within one example of its proportion."""
    split = data.split
    sizes = _split_sizes(split, len(records))
    if "label" in records.columns:
        strata = _strata(records["label"], regression=not label_names)
    else:  # a language-modelling corpus: one stratum, a seeded random split
        strata = pd.Series(np.zeros(len(records), dtype=int))
    rng = np.random.default_rng(split.seed)
    class_counts = strata.value_counts().sort_index()
    allocation = _allocate(sizes, class_counts.to_numpy())
    chosen: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for column, stratum in enumerate(class_counts.index):
        members = rng.permutation(np.flatnonzero(strata.to_numpy() == stratum))
        start = 0
        for row, name in enumerate(SPLIT_NAMES):
            stop = start + allocation[row, column]
            chosen[name].append(members[start:stop])
            start = stop
    frames = []
    for name in SPLIT_NAMES:
        index = rng.permutation(np.concatenate(chosen[name]))
        frames.append(records.iloc[index].reset_index(drop=True))
    return frames[0], frames[1], frames[2]


def _split_sizes(split: SplitParams, available: int) -> list[int]:
    """Counts for the configured sizes, checked against the rows left after cleaning."""
    counts = [
        size if isinstance(size, int) else math.floor(size * available + 1e-9)
        for size in split.sizes
    ]
    if all(isinstance(size, float) for size in split.sizes) and math.isclose(sum(split.sizes), 1.0):
        counts[0] = available - counts[1] - counts[2]  # all rows used: rounding goes to train
    too_small = [name for name, count in zip(SPLIT_NAMES, counts, strict=True) if count < 1]
    if too_small:
        raise ValueError(
            f"data.split sizes give no rows to {too_small} with {available} rows available"
        )
    if sum(counts) > available:
        raise ValueError(
            f"data.split sizes {dict(zip(SPLIT_NAMES, counts, strict=True))} need {sum(counts)} rows "
            f"but only {available} are left after cleaning; lower them or use fractions"
        )
    return counts


def _strata(labels: pd.Series, regression: bool) -> pd.Series:
    if not regression:
        return labels.reset_index(drop=True)
    ranks = labels.rank(method="first").to_numpy()
    bins = min(_REGRESSION_STRATA, len(labels))
    return pd.Series(np.ceil(ranks * bins / len(labels)).astype(int) - 1)


def _allocate(sizes: list[int], class_counts: np.ndarray) -> np.ndarray:
    """Rows per (split, class): each split's share of each class, largest-remainder rounded per
    split without taking more rows of a class than exist."""
    total = class_counts.sum()
    targets = np.outer(sizes, class_counts) / total
    allocation = np.floor(targets + 1e-9).astype(int)
    for row, size in enumerate(sizes):
        remainders = targets[row] - allocation[row]
        for column in np.argsort(-remainders, kind="stable"):
            if allocation[row].sum() >= size:
                break
            if allocation[:, column].sum() < class_counts[column]:
                allocation[row, column] += 1
        while allocation[row].sum() < size:  # only when every class with a remainder ran out
            spare = np.flatnonzero(allocation.sum(axis=0) < class_counts)
            allocation[row, spare[0]] += 1
    return allocation


def _is_corpus(source: dict[str, Any]) -> bool:
    return source.get("model_task") == "causal_lm"


def _sort_key(value: Any) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))
