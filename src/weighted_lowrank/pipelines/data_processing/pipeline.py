"""Wiring of the data_processing pipeline: source → clean → encode labels → stratified split
(a language model's corpus: texts only, random split)."""

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.pipelines.data_processing.nodes import (
    clean_records,
    encode_labels,
    load_source_records,
    resolve_source,
    split_records,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=resolve_source,
                inputs=["params:data", "params:model"],
                outputs="data_source",
                name="resolve_data_source",
            ),
            Node(
                func=load_source_records,
                inputs=["reviews_raw", "data_source"],
                outputs="source_records",
                name="load_source_records",
            ),
            Node(
                func=clean_records,
                inputs=["source_records", "data_source"],
                outputs="clean_records",
                name="clean_records",
            ),
            Node(
                func=encode_labels,
                inputs=["clean_records", "data_source"],
                outputs=["labelled_records", "label_names"],
                name="encode_labels",
            ),
            Node(
                func=split_records,
                inputs=["labelled_records", "params:data", "label_names"],
                outputs=["train_split", "validation_split", "test_split"],
                name="split_records",
            ),
        ]
    )
