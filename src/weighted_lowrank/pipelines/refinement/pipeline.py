"""``refinement``: per solver, compressed model → model fine-tuned after compression.

One namespace per solver in ``SOLVERS`` (as in ``factorization``): ``<solver>.compressed_model``
→ ``<solver>.refined_model`` + ``<solver>.refinement_history``. Off unless
``refinement.enabled`` is true; the evaluation pipeline then reports ``<metric>_refined`` beside
each metric of the compressed model.
"""

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.lowrank.solvers import SOLVERS

from .nodes import refine

SHARED_INPUTS = {"train_split", "validation_split"}
SHARED_PARAMETERS = {"params:model", "params:refinement", "params:seed", "params:device"}


def create_solver_template() -> Pipeline:
    """The un-namespaced refinement of one compressed model."""
    return Pipeline(
        [
            Node(
                refine,
                inputs=[
                    "compressed_model",
                    "train_split",
                    "validation_split",
                    "params:model",
                    "params:refinement",
                    "params:seed",
                    "params:device",
                ],
                outputs=["refined_model", "refinement_history"],
                name="refine",
                tags=["refinement"],
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return sum(
        (
            Pipeline(
                create_solver_template(),
                namespace=solver,
                inputs=SHARED_INPUTS,
                parameters=SHARED_PARAMETERS,
                tags=[solver],
            )
            for solver in SOLVERS
        ),
        Pipeline([]),
    )
