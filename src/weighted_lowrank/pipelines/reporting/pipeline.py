"""``reporting``: evaluations, predictions, layer reports and rank maps → MLflow child runs,
paired tests, comparison table, plots; :func:`create_refined_reporting` (part of ``refinement``)
adds the ``refined.<solver>`` rows and makes the comparison over every row.
"""

from collections.abc import Callable
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


def _node(func: Callable, inputs: str | list | dict, output: str) -> Node:
    return Node(func, inputs, output, name=output)


def create_child_run_pipeline(namespace: str, refined: bool = False) -> Pipeline:
    """A row's evaluation and predictions (and but for ``dense`` its solver's layer report and
    rank map; a refined row's ``params:refinement``) → ``<namespace>.mlflow_run``."""
    solver = base_solver(namespace)
    reports = {"layer_report": f"{solver}.layer_report", "rank_map": f"{solver}.rank_map"}
    function = refined_child_run_record if refined else child_run_record
    if namespace == "dense":
        function, reports = dense_child_run_record, {}
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
    """Paired tests (also logged to the parent run), the comparison table, its Markdown and the
    accuracy-vs-parameters plot over ``namespaces``."""
    evaluations = {namespace: f"{namespace}.evaluation_metrics" for namespace in namespaces}
    predictions = {namespace: f"{namespace}.predictions" for namespace in namespaces}
    markdown_inputs = ["comparison_table", "params:compression", "params:reporting"]
    return Pipeline(
        [
            _node(paired_tests, {"reporting": "params:reporting", **predictions}, "paired_tests"),
            _node(paired_metrics, "paired_tests", "paired_metrics"),
            _node(comparison_table, {"paired": "paired_tests", **evaluations}, "comparison_table"),
            _node(comparison_markdown, markdown_inputs, "comparison_markdown"),
            _node(accuracy_vs_params_figure, "comparison_table", "accuracy_vs_params_plot"),
        ]
    )


def create_refined_reporting() -> Pipeline:
    """Child runs of the ``refined.<solver>`` rows and the comparison over every row."""
    child_runs = [create_child_run_pipeline(name, refined=True) for name in REFINED_NAMESPACES]
    return sum(child_runs, create_summary_pipeline(NAMESPACES + REFINED_NAMESPACES))


def create_pipeline(**kwargs) -> Pipeline:
    layer_reports = {solver: f"{solver}.layer_report" for solver in SOLVERS}
    rank_maps = {solver: f"{solver}.rank_map" for solver in SOLVERS}
    convergence = {
        **{f"{solver}_report": f"{solver}.layer_report" for solver in SOLVERS},
        **{f"{solver}_convergence": f"{solver}.convergence" for solver in SOLVERS},
    }
    figures = Pipeline(
        [
            _node(layer_loss_figure, layer_reports, "layer_loss_plot"),
            _node(
                rank_allocation_figure,
                {"compression": "params:compression", **rank_maps},
                "rank_allocation_plot",
            ),
            _node(
                convergence_figure,
                {"reporting": "params:reporting", **convergence},
                "convergence_plot",
            ),
        ]
    )
    child_runs = [create_child_run_pipeline(namespace) for namespace in NAMESPACES]
    return sum(child_runs, create_summary_pipeline(NAMESPACES) + figures)
