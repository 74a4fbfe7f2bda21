"""data_processing: stratified deterministic splits, every input route, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset

from tests.conftest import block_values, typed_params
from weighted_lowrank.kedro_glue.parameters import DataParams, ParameterError
from weighted_lowrank.pipelines.data_processing import create_pipeline
from weighted_lowrank.pipelines.data_processing.nodes import (
    clean_records,
    encode_labels,
    load_source_records,
    resolve_source,
    split_records,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RAW_REVIEWS = PROJECT_ROOT / "data" / "01_raw" / "rotten_tomatoes_corpus_full.csv.bz2"


def _params(**overrides) -> DataParams:
    """The typed conf/base ``data`` block with nested overrides, e.g. ``split={"train": 10}``."""
    return typed_params("data", **overrides)


def _run_nodes(reviews: pd.DataFrame | None, params: DataParams):
    """Run the pipeline's node functions in order; returns (train, validation, test, names)."""
    source = resolve_source(params)
    records = load_source_records(reviews, source)
    encoded, names = encode_labels(clean_records(records, source), source)
    return (*split_records(encoded, params, names), names)


def _reviews(n_fresh: int = 60, n_rotten: int = 40, n_plot: int = 5) -> pd.DataFrame:
    rows = [("fresh", f"fine film number {i}") for i in range(n_fresh)]
    rows += [("rotten", f"dull film number {i}") for i in range(n_rotten)]
    rows += [("plot", f"a man walks number {i}") for i in range(n_plot)]
    return pd.DataFrame(rows, columns=["category", "text"]).assign(movie_name="m")


SMALL_SPLIT = {"train": 50, "validation": 20, "test": 25, "seed": 3}


@pytest.fixture(scope="module")
def embedded_reviews() -> pd.DataFrame:
    return pd.read_csv(RAW_REVIEWS)


def test_embedded_data_cleans_to_the_documented_counts(embedded_reviews):
    source = resolve_source(_params())
    cleaned = clean_records(load_source_records(embedded_reviews, source), source)
    encoded, names = encode_labels(cleaned, source)
    assert names == ["rotten", "fresh"]
    assert len(encoded) == 12_752
    assert encoded["label"].value_counts().to_dict() == {1: 7_368, 0: 5_384}
    assert not encoded["text"].duplicated().any()
    assert not encoded["text"].str.contains("&amp;").any()


def test_default_split_is_stratified_disjoint_and_sized(embedded_reviews):
    train, validation, test, names = _run_nodes(embedded_reviews, _params())
    overall_fresh = 7_368 / 12_752
    for frame, size in ((train, 2000), (validation, 500), (test, 1000)):
        assert len(frame) == size
        assert list(frame.columns) == ["text", "label"]
        assert frame["label"].dtype == np.int64
        assert abs((frame["label"] == 1).sum() - overall_fresh * size) <= 1
    texts = [set(frame["text"]) for frame in (train, validation, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


@pytest.mark.parametrize(
    "split",
    [
        {"train": 37, "validation": 11, "test": 13},
        {"train": 0.6, "validation": 0.2, "test": 0.2},
        {"train": 0.5, "validation": 7, "test": 0.1},
    ],
)
def test_every_class_is_within_one_example_of_its_overall_share(split):
    labels = ["a"] * 47 + ["b"] * 31 + ["c"] * 22 + ["d"] * 3
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels})
    params = _params(source="csv", local_file={"path": "unused"}, split={**split, "seed": 0})
    source = resolve_source(params)
    encoded, names = encode_labels(clean_records(frame, source), source)
    splits = split_records(encoded, params, names)
    shares = encoded["label"].value_counts(normalize=True)
    for part in splits:
        counts = part["label"].value_counts()
        for label, share in shares.items():
            assert abs(counts.get(label, 0) - share * len(part)) <= 1, (label, len(part))
    if all(isinstance(v, float) for v in split.values()):
        assert sum(len(part) for part in splits) == len(encoded)


def test_same_seed_same_split_and_different_seed_different_split():
    reviews = _reviews()
    first = _run_nodes(reviews, _params(split=SMALL_SPLIT))
    again = _run_nodes(reviews, _params(split=SMALL_SPLIT))
    other = _run_nodes(reviews, _params(split={**SMALL_SPLIT, "seed": 4}))
    for a, b in zip(first[:3], again[:3], strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert set(first[0]["text"]) != set(other[0]["text"])


def test_local_csv_with_sentence_pairs_and_string_labels(tmp_path):
    rows = [(f"premise {i}", f"hypothesis {i}", ["yes", "no", "maybe"][i % 3]) for i in range(60)]
    rows += [
        ("premise 0", "hypothesis 0", "yes"),
        (None, "hypothesis x", "no"),
        ("p", "h", "other"),
    ]
    path = tmp_path / "pairs.csv"
    pd.DataFrame(rows, columns=["premise", "hypothesis", "answer"]).to_csv(path, index=False)
    params = _params(
        source="csv",
        local_file={
            "path": str(path),
            "text_column": "premise",
            "text_pair_column": "hypothesis",
            "label_column": "answer",
            "label_values": ["no", "maybe", "yes"],
        },
        split={"train": 30, "validation": 12, "test": 18, "seed": 1},
    )
    train, validation, test, names = _run_nodes(None, params)
    assert names == ["no", "maybe", "yes"]
    everything = pd.concat([train, validation, test])
    assert list(train.columns) == ["text", "text_pair", "label"]
    assert len(everything) == 60 and not everything[["text", "text_pair"]].duplicated().any()
    expected = {"yes": 2, "no": 0, "maybe": 1}
    for row in everything.itertuples():
        number = int(row.text.split()[1])
        assert row.text_pair == f"hypothesis {number}"
        assert row.label == expected[["yes", "no", "maybe"][number % 3]]


def test_local_parquet_with_integer_labels_and_derived_label_values(tmp_path):
    frame = pd.DataFrame({"review": [f"r{i}" for i in range(40)], "stars": [1, 5] * 20})
    path = tmp_path / "reviews.parquet"
    frame.to_parquet(path)
    params = _params(
        source="parquet",
        local_file={"path": str(path), "text_column": "review", "label_column": "stars"},
        split={"train": 20, "validation": 10, "test": 10, "seed": 0},
    )
    train, validation, test, names = _run_nodes(None, params)
    assert names == ["1", "5"]
    everything = pd.concat([train, validation, test])
    stars = dict(zip(frame["review"], frame["stars"], strict=True))
    assert all(stars[row.text] == [1, 5][row.label] for row in everything.itertuples())


def _write_glue_mrpc(directory: Path) -> dict[str, str]:
    files = {}
    for split, count, offset in (("train", 40, 0), ("validation", 20, 100), ("test", 10, 200)):
        numbers = range(offset, offset + count)
        frame = pd.DataFrame(
            {
                "sentence1": [f"first {i}" for i in numbers],
                "sentence2": [f"second {i}" for i in numbers],
                # GLUE hides test labels as -1; those rows must be dropped.
                "label": [-1 if split == "test" else i % 2 for i in numbers],
                "idx": list(numbers),
            }
        )
        files[split] = str(directory / f"{split}.parquet")
        frame.to_parquet(files[split])
    return files


def test_glue_task_from_local_files_uses_glue_columns_and_label_names(tmp_path):
    files = _write_glue_mrpc(tmp_path)
    params = _params(
        source="glue",
        glue={"task": "mrpc", "data_files": files, "cache_dir": str(tmp_path / "cache")},
        split={"train": 30, "validation": 12, "test": 18, "seed": 0},
    )
    train, validation, test, names = _run_nodes(None, params)
    assert names == ["not_equivalent", "equivalent"]
    everything = pd.concat([train, validation, test])
    assert list(train.columns) == ["text", "text_pair", "label"]
    assert len(everything) == 60  # train + validation rows; unlabelled test rows dropped
    assert all(row.label == int(row.text.split()[1]) % 2 for row in everything.itertuples())


def test_glue_regression_task_keeps_float_targets(tmp_path):
    path = tmp_path / "stsb.csv"
    pd.DataFrame(
        {
            "sentence1": [f"a {i}" for i in range(50)],
            "sentence2": [f"b {i}" for i in range(50)],
            "label": np.linspace(0.0, 5.0, 50),
        }
    ).to_csv(path, index=False)
    params = _params(
        source="glue",
        glue={"task": "stsb", "data_files": {"train": str(path)}, "cache_dir": str(tmp_path / "c")},
        split={"train": 25, "validation": 10, "test": 15, "seed": 0},
    )
    train, validation, test, names = _run_nodes(None, params)
    assert names == []
    assert train["label"].dtype == np.float32
    # Quantile-bin stratification: each split spans the whole range of scores.
    for part in (train, validation, test):
        assert part["label"].min() < 1.0 and part["label"].max() > 4.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"source": "excel"}, r"data\.source='excel': expected one of \['catalog'"),
        ({"source": "csv"}, r"data\.local_file\.path to be set when data\.source is 'csv'"),
        ({"catalog": {"label_values": ["fresh"]}}, r"data\.catalog\.label_values.*two labels"),
        ({"catalog": {"label_values": ["a", "a"]}}, r"data\.catalog\.label_values.*distinct"),
        ({"catalog": {"label_names": ["x"]}}, r"data\.catalog\.label_names.*one name per"),
        ({"catalog": {"task_type": "ranking"}}, r"data\.catalog\.task_type='ranking'"),
        ({"local_file": {"text_column": ""}}, r"data\.local_file\.text_column=''"),
        ({"split": {"train": 0}}, r"data\.split\.train=0: expected a count >= 1"),
        ({"split": {"validation": True}}, r"data\.split\.validation=True"),
        ({"split": {"train": 0.7, "validation": 0.2, "test": 0.2}}, "adding up to at most 1"),
        ({"split": {"seed": "x"}}, r"data\.split\.seed='x': expected an int >= 0"),
    ],
)
def test_the_data_block_rejects_bad_values_naming_the_key(overrides, message):
    with pytest.raises(ParameterError, match=message):
        DataParams.model_validate(block_values("data", **overrides))


def test_an_unknown_glue_task_fails_before_reading_anything():
    with pytest.raises(ValueError, match=r"data\.glue\.task is 'imdb'; expected one of \['cola'"):
        resolve_source(_params(source="glue", glue={"task": "imdb"}))


def test_the_flat_source_describes_the_chosen_block():
    catalog = resolve_source(_params())
    assert catalog["type"] == "catalog" and catalog["label_column"] == "category"
    assert catalog["label_values"] == ["rotten", "fresh"] and catalog["unescape_html"] is True
    assert "path" not in catalog and catalog["read_args"] == {}
    local = resolve_source(
        _params(source="csv", local_file={"path": "x.tsv", "read_args": {"sep": ";"}})
    )
    assert local["path"] == "x.tsv" and local["read_args"] == {"sep": ";"}
    assert local["label_column"] == "label" and local["unescape_html"] is False
    glue = resolve_source(_params(source="glue", glue={"task": "SST-2"}))
    assert glue["task"] == "sst2" and glue["label_names"] == ["negative", "positive"]
    assert glue["label_values"] == [0, 1] and glue["text_column"] == "sentence"


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.csv"
    source = resolve_source(_params(source="csv", local_file={"path": str(missing)}))
    with pytest.raises(ValueError, match=r"nope\.csv' does not exist"):
        load_source_records(None, source)
    glue = resolve_source(_params(source="glue", glue={"task": "sst2", "data_files": str(missing)}))
    with pytest.raises(ValueError, match=r"data_files: file\(s\) .*nope\.csv"):
        load_source_records(None, glue)


def test_missing_columns_are_named_with_the_available_ones():
    source = resolve_source(_params(catalog={"text_column": "review"}))
    with pytest.raises(ValueError, match=r"column\(s\) \['review'\].*'category', 'text'"):
        load_source_records(_reviews(), source)


def test_empty_data_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    pd.DataFrame({"text": [], "label": []}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="has no rows"):
        load_source_records(
            None, resolve_source(_params(source="csv", local_file={"path": str(path)}))
        )
    source = resolve_source(_params())
    only_plots = _reviews(n_fresh=0, n_rotten=0, n_plot=5)
    with pytest.raises(ValueError, match="no usable rows left after cleaning 5 rows"):
        clean_records(load_source_records(only_plots, source), source)


def test_a_single_class_is_refused():
    source = resolve_source(_params())
    records = clean_records(load_source_records(_reviews(n_rotten=0), source), source)
    with pytest.raises(ValueError, match=r"only one class \('fresh'\)"):
        encode_labels(records, source)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"train": 80, "validation": 20, "test": 10}, "need 110 rows but only 100"),
        ({"train": 10, "validation": 0.001, "test": 5}, r"no rows to \['validation'\]"),
    ],
)
def test_split_sizes_that_do_not_fit_the_cleaned_rows_are_refused(split, message):
    source = resolve_source(_params())
    encoded, names = encode_labels(
        clean_records(load_source_records(_reviews(), source), source), source
    )
    assert len(encoded) == 100
    with pytest.raises(ValueError, match=message):
        split_records(encoded, _params(split={"seed": 0, **split}), names)


def test_pipeline_runs_on_an_in_memory_catalog(tmp_path):
    params = _params(split=SMALL_SPLIT)
    catalog = DataCatalog(
        {
            "reviews_raw": MemoryDataset(_reviews()),
            # Typed, as the TypedParameters hook hands it to the nodes in a run.
            "params:data": MemoryDataset(params, copy_mode="assign"),
            "params:model": MemoryDataset(typed_params("model"), copy_mode="assign"),
            # Persisted as in the project catalog: the runner releases consumed memory data.
            "label_names": JSONDataset(filepath=str(tmp_path / "label_names.json")),
        }
    )
    split_names = ["train_split", "validation_split", "test_split"]
    for name in split_names:
        catalog[name] = MemoryDataset()
    SequentialRunner().run(create_pipeline(), catalog)

    splits = [catalog.load(name) for name in split_names]
    assert [len(part) for part in splits] == [50, 20, 25]
    assert catalog.load("label_names") == ["rotten", "fresh"]
    texts = pd.concat(splits)["text"]
    assert not texts.duplicated().any() and not texts.str.startswith("a man walks").any()
    expected = _run_nodes(_reviews(), params)
    pd.testing.assert_frame_equal(splits[0], expected[0])
