"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

#: Registered but left out of ``__default__`` (too slow for every run); run them by name.
OPTIONAL_PIPELINES = ("risk_validation",)


def register_pipelines() -> dict[str, Pipeline]:
    """Register every pipeline under its package name; ``__default__`` runs all but the optional.

    ``risk_validation`` evaluates the validation split twice per targeted layer: run it with
    ``kedro run --pipelines risk_validation`` after a default run (it loads the latest versions).
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        pipeline for name, pipeline in pipelines.items() if name not in OPTIONAL_PIPELINES
    )
    return pipelines
