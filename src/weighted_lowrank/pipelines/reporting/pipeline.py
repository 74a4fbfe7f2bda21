"""``reporting``: evaluations, predictions + layer reports and rank maps → MLflow child runs,
paired tests, comparison table, plots.

:func:`create_pipeline` (``reporting``, part of ``__default__``) reports the rows ``dense`` and
one per solver; :func:`create_refined_reporting` (part of ``refinement``) adds the child runs of
the ``refined.<solver>`` rows and makes the comparison (:data:`SUMMARY_NODES`) over every row.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.analysis.run_history import REFINED_PREFIX, base_solver
from weighted_lowrank.lowrank.solvers import SOLVERS

from .nodes import (
    accuracy_vs_params_figure,
    child_run_record,
    comparison_markdown,
    comparison_table,
    convergence_figure,
    dense_child_run_record,
    layer_loss_figure,
    paired_metrics,
    paired_tests,
    rank_allocation_figure,
    refined_child_run_record,
)

NAMESPACES = ("dense", *SOLVERS)
REFINED_NAMESPACES = tuple(f"{REFINED_PREFIX}{solver}" for solver in SOLVERS)
#: The nodes that compare rows: the comparison over every row replaces them in ``refined``.
SUMMARY_NODES = (
    "paired_tests",
    "paired_metrics",
    "comparison_table",
    "comparison_markdown",
    "accuracy_vs_params_plot",
)
CHILD_RUN_PARAMETERS = ["params:compression", "params:model", "params:data", "params:seed"]


def create_child_run_pipeline(namespace: str, refined: bool = False) -> Pipeline:
    """``<namespace>.evaluation_metrics`` + ``<namespace>.predictions`` (+ the solver's
    ``<solver>.layer_report`` and ``<solver>.rank_map`` for every row but ``dense``) →
    ``<namespace>.mlflow_run`` (a refined row also reads ``params:refinement``, which its
    ``refinement`` param describes)."""
    if namespace == "dense":
        function, reports = dense_child_run_record, {}
    else:
        function = refined_child_run_record if refined else child_run_record
        solver = base_solver(namespace)
        reports = {"layer_report": f"{solver}.layer_report", "rank_map": f"{solver}.rank_map"}
    record = update_wrapper(partial(function, namespace=namespace), function)
    parameters = CHILD_RUN_PARAMETERS + (["params:refinement"] if refined else [])
    return Pipeline(
        [
            Node(
                record,
                inputs=["evaluation_metrics", "predictions", *reports, *parameters],
                outputs="mlflow_run",
                name="record_child_run",
            )
        ],
        namespace=namespace,
        inputs={
            "evaluation_metrics": f"{namespace}.evaluation_metrics",
            "predictions": f"{namespace}.predictions",
            **reports,
        },
        parameters=set(parameters),
    )


def create_summary_pipeline(namespaces: tuple[str, ...]) -> Pipeline:
    """Paired tests, the comparison table, its Markdown and the accuracy-vs-parameters plot over
    ``namespaces``; the paired tests are also logged to the parent run (``paired_metrics``)."""
    evaluations = {namespace: f"{namespace}.evaluation_metrics" for namespace in namespaces}
    predictions = {namespace: f"{namespace}.predictions" for namespace in namespaces}
    return Pipeline(
        [
            Node(
                paired_tests,
                inputs={"reporting": "params:reporting", **predictions},
                outputs="paired_tests",
                name="paired_tests",
            ),
            Node(
                paired_metrics,
                inputs="paired_tests",
                outputs="paired_metrics",
                name="paired_metrics",
            ),
            Node(
                comparison_table,
                inputs={"paired": "paired_tests", **evaluations},
                outputs="comparison_table",
                name="comparison_table",
            ),
            Node(
                comparison_markdown,
                inputs=["comparison_table", "params:compression", "params:reporting"],
                outputs="comparison_markdown",
                name="comparison_markdown",
            ),
            Node(
                accuracy_vs_params_figure,
                inputs="comparison_table",
                outputs="accuracy_vs_params_plot",
                name="accuracy_vs_params_plot",
            ),
        ]
    )


def create_refined_reporting() -> Pipeline:
    """Child runs of the ``refined.<solver>`` rows and the comparison over every row."""
    child_runs = [create_child_run_pipeline(name, refined=True) for name in REFINED_NAMESPACES]
    return sum(child_runs, create_summary_pipeline(NAMESPACES + REFINED_NAMESPACES))


def create_pipeline(**kwargs) -> Pipeline:
    layer_reports = {solver: f"{solver}.layer_report" for solver in SOLVERS}
    figures = Pipeline(
        [
            Node(
                layer_loss_figure,
                inputs=layer_reports,
                outputs="layer_loss_plot",
                name="layer_loss_plot",
            ),
            Node(
                rank_allocation_figure,
                inputs={
                    "compression": "params:compression",
                    **{solver: f"{solver}.rank_map" for solver in SOLVERS},
                },
                outputs="rank_allocation_plot",
                name="rank_allocation_plot",
            ),
            Node(
                convergence_figure,
                inputs={
                    "reporting": "params:reporting",
                    **{f"{solver}_report": f"{solver}.layer_report" for solver in SOLVERS},
                    **{f"{solver}_convergence": f"{solver}.convergence" for solver in SOLVERS},
                },
                outputs="convergence_plot",
                name="convergence_plot",
            ),
        ]
    )
    child_runs = [create_child_run_pipeline(namespace) for namespace in NAMESPACES]
    return sum(child_runs, create_summary_pipeline(NAMESPACES) + figures)
