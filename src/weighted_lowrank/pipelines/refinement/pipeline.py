"""``refinement``: fine-tune every compressed model after compression, and report it as its own rows.

Not part of ``__default__`` (Kedro builds pipelines before it reads parameters, so a pipeline,
not a parameter, switches it on). Per solver, namespace ``refined.<solver>``: ``refine``, the
evaluation template and a child run; then the comparison over every row.
"""

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.analysis.run_history import REFINED_PREFIX
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.evaluation.pipeline import create_compressed_evaluation
from weighted_lowrank.pipelines.reporting.pipeline import create_refined_reporting

from .nodes import refine

SHARED_INPUTS = {"train_split", "validation_split"}
SHARED_PARAMETERS = {"params:model", "params:refinement", "params:seed", "params:device"}


def create_solver_template() -> Pipeline:
    """The un-namespaced refinement of one compressed model (``unrefined_model`` is the input)."""
    data = ["unrefined_model", "train_split", "validation_split"]
    inputs = data + ["params:model", "params:refinement", "params:seed", "params:device"]
    outputs = ["compressed_model", "refinement_history"]
    return Pipeline([Node(refine, inputs, outputs, name="refine", tags=["refinement"])])


def create_refine_pipeline() -> Pipeline:
    """Only the refine nodes: ``<solver>.compressed_model`` → ``refined.<solver>.*``."""
    return sum(
        (
            Pipeline(
                create_solver_template(),
                namespace=f"{REFINED_PREFIX}{solver}",
                inputs={
                    "unrefined_model": f"{solver}.compressed_model",
                    **{name: name for name in SHARED_INPUTS},
                },
                parameters=SHARED_PARAMETERS,
                tags=[solver],
            )
            for solver in SOLVERS
        ),
        Pipeline([]),
    )


def create_pipeline(**kwargs) -> Pipeline:
    """Refine, evaluate and report the refined rows; the comparison over every row."""
    evaluations = [
        create_compressed_evaluation(f"{REFINED_PREFIX}{solver}", solver) for solver in SOLVERS
    ]
    return sum(evaluations, create_refine_pipeline()) + create_refined_reporting()
