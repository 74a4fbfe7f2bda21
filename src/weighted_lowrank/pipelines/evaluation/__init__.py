"""Evaluate the dense fine-tuned model and every compressed model on the test split."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
