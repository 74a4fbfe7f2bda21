"""``evaluation``: test-split metrics, parameter counts, size and CPU latency of every model.

Namespace ``dense`` evaluates the fine-tuned model; one namespace per solver in ``SOLVERS``
evaluates ``<solver>.compressed_model`` (with ``<solver>.layer_report``) against it, and
``<solver>.refined_model`` when ``refinement.enabled``. Each writes
``<namespace>.evaluation_metrics``, a flat dict of floats with the same keys everywhere.
"""

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.lowrank.solvers import SOLVERS

from .nodes import evaluate_compressed, evaluate_dense

SHARED_INPUTS = {"fine_tuned_model", "test_split"}
SHARED_PARAMETERS = {
    "params:model",
    "params:evaluation",
    "params:compression",
    "params:refinement",
}


def create_solver_template() -> Pipeline:
    """The un-namespaced evaluation of one compressed model."""
    return Pipeline(
        [
            Node(
                evaluate_compressed,
                inputs=[
                    "compressed_model",
                    "fine_tuned_model",
                    "layer_report",
                    "test_split",
                    "params:model",
                    "params:evaluation",
                    "refined_model",
                    "refinement_history",
                    "params:refinement",
                ],
                outputs="evaluation_metrics",
                name="evaluate",
                tags=["evaluation"],
            )
        ]
    )


def create_dense_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate_dense,
                inputs=[
                    "fine_tuned_model",
                    "test_split",
                    "params:model",
                    "params:evaluation",
                    "params:compression",
                    "params:refinement",
                ],
                outputs="evaluation_metrics",
                name="evaluate",
                tags=["evaluation"],
            )
        ],
        namespace="dense",
        inputs=SHARED_INPUTS,
        parameters=SHARED_PARAMETERS,
        tags=["dense"],
    )


def create_pipeline(**kwargs) -> Pipeline:
    solver_pipelines = [
        Pipeline(
            create_solver_template(),
            namespace=solver,
            inputs=SHARED_INPUTS,
            parameters={"params:model", "params:evaluation", "params:refinement"},
            tags=[solver],
        )
        for solver in SOLVERS
    ]
    return sum(solver_pipelines, create_dense_pipeline())
