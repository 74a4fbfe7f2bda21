"""Project pipelines."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

from weighted_lowrank.pipelines.refined.pipeline import default_pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Every pipeline under its package name, and ``__default__``: the default run.

    Not in ``__default__``: ``risk_validation`` (evaluates the validation split twice per
    targeted layer) and ``refinement`` (fine-tunes every compressed model again) — run them by
    name after a default run, they load its latest versions; ``kedro run --pipelines refinement``
    adds the ``refined.<solver>`` rows and rewrites the comparison over every row. ``refined`` is
    the whole run with refinement (``kedro run --pipelines refined``).
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = default_pipeline()
    return pipelines
