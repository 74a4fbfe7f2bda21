"""``factorization``: fine-tuned model + Fisher → per solver a compressed model and a layer report.

One namespace per solver in ``SOLVERS`` (the list lives in code because pipelines are built before
parameters are read). Every namespace shares ``fine_tuned_model``, ``fisher_information`` and
``params:compression``; its own knobs are ``params:<solver>.options``; its outputs are
``<solver>.compressed_model`` and ``<solver>.layer_report``.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.lowrank.solvers import SOLVERS

from .nodes import compress

SHARED_INPUTS = {"fine_tuned_model", "fisher_information"}
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
                    "params:compression",
                    "params:options",
                ],
                outputs=["compressed_model", "layer_report"],
                name="compress",
                tags=["factorization", solver],
            )
        ]
    )


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
        Pipeline([]),
    )
