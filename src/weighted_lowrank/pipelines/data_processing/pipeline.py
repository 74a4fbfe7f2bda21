"""Wiring of the data_processing pipeline: source → clean → encode labels → stratified split
(a language model's corpus: texts only, random split)."""

from kedro.pipeline import Node, Pipeline

from .nodes import clean_records, encode_labels, load_source_records, resolve_source, split_records


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                resolve_source,
                ["params:data", "params:model"],
                "data_source",
                name="resolve_data_source",
            ),
            Node(
                load_source_records,
                ["reviews_raw", "data_source"],
                "source_records",
                name="load_source_records",
            ),
            Node(
                clean_records,
                ["source_records", "data_source"],
                "clean_records",
                name="clean_records",
            ),
            Node(
                encode_labels,
                ["clean_records", "data_source"],
                ["labelled_records", "label_names"],
                name="encode_labels",
            ),
            Node(
                split_records,
                ["labelled_records", "params:data", "label_names"],
                ["train_split", "validation_split", "test_split"],
                name="split_records",
            ),
        ]
    )
