"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from weighted_lowrank.pipelines.factorization.pipeline import create_reference_pipeline
from weighted_lowrank.pipelines.refined.pipeline import default_pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Every pipeline under its package name, and ``__default__``: the default run.

    ``fisher_estimation`` also makes the SVD reference (a node outside every solver namespace),
    so that after the upstream pipelines ``--pipelines factorization --namespaces <solver>``
    finds it; a run of both makes it once."""
    pipelines = find_pipelines(raise_errors=True)
    if "fisher_estimation" in pipelines:  # Kedro loads only the packages --pipelines names
        pipelines["fisher_estimation"] += create_reference_pipeline()
    pipelines["__default__"] = default_pipeline()
    return pipelines
