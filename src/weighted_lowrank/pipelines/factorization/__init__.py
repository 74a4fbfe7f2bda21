"""Compress the fine-tuned model with every solver, one namespace per solver."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
