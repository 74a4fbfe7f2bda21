"""``factorization``: fine-tuned model + Fisher → per solver a compressed model and a layer report.

The shared node ``svd_reference`` computes plain SVD's weighted loss per layer once
(``svd_reference_loss``). Then one namespace per solver in ``SOLVERS`` (the list lives in code
because pipelines are built before parameters are read): every namespace shares
``fine_tuned_model``, ``fisher_information``, ``calibration_statistics``, ``svd_reference_loss``
and ``params:compression``;
its own knobs are ``params:<solver>.options``; its outputs are ``<solver>.compressed_model``,
``<solver>.layer_report`` and ``<solver>.convergence``.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.lowrank.solvers import SOLVERS

from .nodes import compress, svd_reference

SHARED_INPUTS = {
    "fine_tuned_model",
    "fisher_information",
    "calibration_statistics",
    "svd_reference_loss",
}
SHARED_PARAMETERS = {"params:compression"}


def create_solver_template(solver: str) -> Pipeline:
    """The un-namespaced pipeline of one solver."""
    compress_with_solver = update_wrapper(partial(compress, solver=solver), compress)
    return Pipeline(
        [
            Node(
                compress_with_solver,
                inputs=[
                    "fine_tuned_model",
                    "fisher_information",
                    "calibration_statistics",
                    "svd_reference_loss",
                    "params:compression",
                    "params:options",
                ],
                outputs=["compressed_model", "layer_report", "convergence"],
                name="compress",
                tags=["factorization", solver],
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    reference = Pipeline(
        [
            Node(
                svd_reference,
                inputs=["fine_tuned_model", "fisher_information", "params:compression"],
                outputs="svd_reference_loss",
                name="svd_reference",
                tags=["factorization"],
            )
        ]
    )
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
        reference,
    )
