"""Does a cheap risk statistic (φ by default) predict where plain SVD damages accuracy?

Not part of ``__default__`` (≈ 2 validation passes per targeted layer): run it with
``kedro run --pipelines risk_validation`` after a default run.
"""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
