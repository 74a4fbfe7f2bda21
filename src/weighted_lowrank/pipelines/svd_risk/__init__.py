"""Per-layer risk that plain SVD hurts: the Kronecker-predicted loss increase of SVD, φ(W) and
other cheap statistics of the Fisher."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
