"""data_processing: raw reviews (or a CSV/Parquet file, or a GLUE task) → stratified splits."""

from weighted_lowrank.pipelines.data_processing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
