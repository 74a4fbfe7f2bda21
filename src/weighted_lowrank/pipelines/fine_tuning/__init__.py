"""Fine-tune the base model on the task's train split."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
