"""The whole run with refinement: ``__default__`` plus fine-tuning after compression."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
