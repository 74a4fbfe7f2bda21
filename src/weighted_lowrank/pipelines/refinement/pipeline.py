"""``refinement``: fine-tune every compressed model after compression, and report it as its own rows.

Not part of ``__default__`` (a pipeline, not a parameter, switches it on, since Kedro builds
pipelines before it reads parameters). Per solver in ``SOLVERS``, namespace ``refined.<solver>``:

* ``refine``: ``<solver>.compressed_model`` → ``refined.<solver>.compressed_model`` +
  ``refined.<solver>.refinement_history``;
* the evaluation template of every solver (``refined.<solver>.evaluation_metrics``, with the
  solver's ``<solver>.layer_report``) and one MLflow child run ``refined.<solver>``;

then the comparison table, its Markdown and the accuracy-vs-parameters plot over every row
(``dense``, the solvers, the refined solvers). ``kedro run --pipelines refinement`` after a
default run refines its latest compressed models and rewrites the comparison with refined rows;
``kedro run --pipelines refined`` is the whole run with refinement (see ``pipeline_registry``).
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
    return Pipeline(
        [
            Node(
                refine,
                inputs=[
                    "unrefined_model",
                    "train_split",
                    "validation_split",
                    "params:model",
                    "params:refinement",
                    "params:seed",
                    "params:device",
                ],
                outputs=["compressed_model", "refinement_history"],
                name="refine",
                tags=["refinement"],
            )
        ]
    )


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
