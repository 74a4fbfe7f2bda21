"""Which cheap risk statistic (φ by default) or loss model predicts where compression hurts?

Not part of ``__default__`` (≈ 1 validation pass per targeted layer and validated solver): run it
with ``kedro run --pipelines risk_validation`` after a default run.
"""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
