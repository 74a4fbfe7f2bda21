"""``refinement``: fine-tune every compressed model after compression (off unless enabled)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
