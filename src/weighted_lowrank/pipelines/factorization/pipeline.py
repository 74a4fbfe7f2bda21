"""``factorization``: fine-tuned model + Fisher → per solver a compressed model and a layer report.

The shared node ``svd_reference`` computes plain SVD's weighted loss per layer once at the uniform
ranks (``svd_reference_loss``; ``fisher_estimation`` makes it too, so that a run of one namespace
finds it after the upstream pipelines). Then one namespace per solver in ``SOLVERS`` (the list
lives in code because pipelines are built before parameters are read): ``loss_curves`` (every
layer's predicted loss at every rank, ``<solver>.loss_curves``) → ``allocate`` (the ranks under
``compression.allocation``, ``<solver>.rank_map``; it takes the SVD reference as an input, so
``--from-nodes svd_reference`` redoes every allocation) → ``compress``. Every namespace shares
``fine_tuned_model``, ``fisher_information``, ``calibration_statistics``, ``svd_reference_loss``
and ``params:compression``; its own knobs are ``params:<solver>.options``; its outputs are
``<solver>.loss_curves``, ``<solver>.rank_map``, ``<solver>.compressed_model``,
``<solver>.layer_report`` and ``<solver>.convergence``.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.kedro_glue.lineage import independent_of
from weighted_lowrank.lowrank.solvers import SOLVERS

from .nodes import allocate, compress, loss_curves, svd_reference

SHARED_INPUTS = {
    "fine_tuned_model",
    "fisher_information",
    "calibration_statistics",
    "svd_reference_loss",
}
SHARED_PARAMETERS = {"params:compression"}
#: The keys a sweep varies after the first run of a seed; the curves do not depend on them.
BUDGET_KEYS = ("compression.budget", "compression.allocation")


def create_solver_template(solver: str) -> Pipeline:
    """The un-namespaced pipeline of one solver: loss curves → rank map → factorization."""

    def bound(function):
        return update_wrapper(partial(function, solver=solver), function)

    return Pipeline(
        [
            Node(
                # Made once per seed: a sweep's later budgets reuse them (sweep.RESTART_NODES).
                independent_of(bound(loss_curves), *BUDGET_KEYS),
                inputs=[
                    "fine_tuned_model",
                    "fisher_information",
                    "calibration_statistics",
                    "params:compression",
                    "params:options",
                ],
                outputs="loss_curves",
                name="loss_curves",
                tags=["factorization", "allocation", solver],
            ),
            Node(
                bound(allocate),
                inputs=["loss_curves", "svd_reference_loss", "params:compression"],
                outputs="rank_map",
                name="allocate",
                tags=["factorization", "allocation", solver],
            ),
            Node(
                bound(compress),
                inputs=[
                    "fine_tuned_model",
                    "fisher_information",
                    "calibration_statistics",
                    "svd_reference_loss",
                    "rank_map",
                    "params:compression",
                    "params:options",
                ],
                outputs=["compressed_model", "layer_report", "convergence"],
                name="compress",
                tags=["factorization", solver],
            ),
        ]
    )


def create_reference_pipeline() -> Pipeline:
    """The shared ``svd_reference`` node (also in ``fisher_estimation``, see the registry)."""
    node = Node(
        svd_reference,
        inputs=["fine_tuned_model", "fisher_information", "params:compression"],
        outputs="svd_reference_loss",
        name="svd_reference",
        tags=["factorization"],
    )
    return Pipeline([node])


def create_pipeline(**kwargs) -> Pipeline:
    return sum(
        (
            Pipeline(
                create_solver_template(solver),
                namespace=solver,
                inputs=SHARED_INPUTS,
                parameters=SHARED_PARAMETERS,
            )
            for solver in SOLVERS
        ),
        create_reference_pipeline(),
    )
