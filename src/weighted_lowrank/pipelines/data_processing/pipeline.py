"""Wiring of the data_processing pipeline: source → clean → encode labels → stratified split
(a language model's corpus: texts only, random split)."""

from collections.abc import Callable

from kedro.pipeline import Node, Pipeline

from .nodes import clean_records, encode_labels, load_source_records, resolve_source, split_records


def _named(func: Callable, inputs: list[str], outputs: str | list[str]) -> Node:
    return Node(func, inputs, outputs, name=func.__name__)


def create_pipeline(**kwargs) -> Pipeline:
    source = "data_source"
    return Pipeline(
        [
            Node(
                resolve_source, ["params:data", "params:model"], source, name="resolve_data_source"
            ),
            _named(load_source_records, ["reviews_raw", source], "source_records"),
            _named(clean_records, ["source_records", source], "clean_records"),
            _named(encode_labels, ["clean_records", source], ["labelled_records", "label_names"]),
            _named(
                split_records,
                ["labelled_records", "params:data", "label_names"],
                ["train_split", "validation_split", "test_split"],
            ),
        ]
    )
