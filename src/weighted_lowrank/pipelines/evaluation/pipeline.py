"""``evaluation``: test-split metrics, parameter counts, size and CPU latency of every model.

Namespace ``dense`` evaluates the fine-tuned model, one namespace per solver in ``SOLVERS`` its
``compressed_model``; each writes ``<namespace>.evaluation_metrics`` and ``.predictions``. The
``refinement`` pipeline reuses the solver template under ``refined.<solver>``.
"""

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.kedro_glue.lineage import independent_of
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.factorization.pipeline import BUDGET_KEYS

from .nodes import evaluate_compressed, evaluate_dense

SHARED_INPUTS = {"fine_tuned_model", "test_split"}
SHARED_PARAMETERS = {"params:model", "params:evaluation"}


def _evaluate(function, inputs: list[str]) -> Pipeline:
    """One ``evaluate`` node: ``inputs`` → ``evaluation_metrics`` + ``predictions``."""
    outputs = ["evaluation_metrics", "predictions"]
    return Pipeline([Node(function, inputs, outputs, name="evaluate", tags=["evaluation"])])


def create_solver_template() -> Pipeline:
    """The un-namespaced evaluation of one compressed model."""
    models = ["compressed_model", "fine_tuned_model", "layer_report", "rank_map", "test_split"]
    return _evaluate(evaluate_compressed, [*models, "params:model", "params:evaluation"])


def create_dense_pipeline() -> Pipeline:
    inputs = ["fine_tuned_model", "test_split", "params:model", "params:evaluation"]
    return Pipeline(
        # reads compression.targets only
        _evaluate(independent_of(evaluate_dense, *BUDGET_KEYS), [*inputs, "params:compression"]),
        namespace="dense",
        inputs=SHARED_INPUTS,
        parameters={*SHARED_PARAMETERS, "params:compression"},
        tags=["dense"],
    )


def create_compressed_evaluation(namespace: str, solver: str) -> Pipeline:
    """The solver template under ``namespace`` (the solver, or ``refined.<solver>``, which keeps
    the solver's factorization, hence its ``layer_report`` and ``rank_map``)."""
    return Pipeline(
        create_solver_template(),
        namespace=namespace,
        inputs={
            **{name: name for name in SHARED_INPUTS},
            "layer_report": f"{solver}.layer_report",
            "rank_map": f"{solver}.rank_map",
        },
        parameters=SHARED_PARAMETERS,
        tags=[solver],
    )


def create_pipeline(**kwargs) -> Pipeline:
    solver_pipelines = [create_compressed_evaluation(solver, solver) for solver in SOLVERS]
    return sum(solver_pipelines, create_dense_pipeline())
