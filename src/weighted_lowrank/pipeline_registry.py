"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from weighted_lowrank.pipelines.factorization.pipeline import create_reference_pipeline
from weighted_lowrank.pipelines.refined.pipeline import default_pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Every pipeline under its package name, and ``__default__``: the default run.

    ``fisher_estimation`` also makes the SVD reference (``svd_reference``, a factorization node
    outside every solver namespace): after the upstream pipelines, ``--pipelines factorization
    --namespaces <solver>`` finds it. Pipelines are sets of nodes, so a run of both makes it once.

    Not in ``__default__``: ``risk_validation`` (evaluates the validation split twice per
    targeted layer) and ``refinement`` (fine-tunes every compressed model again) — run them by
    name after a default run, they load its latest versions; ``kedro run --pipelines refinement``
    adds the ``refined.<solver>`` rows and rewrites the comparison over every row. ``refined`` is
    the whole run with refinement (``kedro run --pipelines refined``).
    """
    pipelines = find_pipelines(raise_errors=True)
    if "fisher_estimation" in pipelines:  # Kedro loads only the packages --pipelines names
        pipelines["fisher_estimation"] += create_reference_pipeline()
    pipelines["__default__"] = default_pipeline()
    return pipelines
