"""Per-layer risk that plain SVD hurts: φ(W) and other cheap statistics of the Fisher."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
