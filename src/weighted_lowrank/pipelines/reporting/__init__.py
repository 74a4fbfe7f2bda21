"""Compare every solver with the dense model: MLflow child runs, table and plots."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
