"""``refined``: every pipeline of the default run, then ``refinement`` and one comparison of all rows.

A package of its own (not a sum in ``pipeline_registry``) because Kedro 1.7 loads only the
packages a ``--pipelines`` filter names: ``kedro run --pipelines refined`` imports this one.
"""

from kedro.pipeline import Pipeline

from weighted_lowrank.pipelines import (
    data_processing,
    evaluation,
    factorization,
    fine_tuning,
    fisher_estimation,
    refinement,
    reporting,
    svd_risk,
)
from weighted_lowrank.pipelines.reporting.pipeline import SUMMARY_NODES

#: The packages of the default run, in data-flow order.
DEFAULT_PACKAGES = (
    data_processing,
    fine_tuning,
    fisher_estimation,
    svd_risk,
    factorization,
    evaluation,
    reporting,
)


def default_pipeline() -> Pipeline:
    """``__default__``: every package of the default run."""
    return sum((package.create_pipeline() for package in DEFAULT_PACKAGES), Pipeline([]))


def create_pipeline(**kwargs) -> Pipeline:
    """``__default__`` whose comparison gives way to ``refinement``'s over every row."""
    default = default_pipeline()
    return (default - default.only_nodes(*SUMMARY_NODES)) + refinement.create_pipeline()
