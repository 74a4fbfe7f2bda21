"""Estimate the empirical Fisher information of the fine-tuned model's targeted weights."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
