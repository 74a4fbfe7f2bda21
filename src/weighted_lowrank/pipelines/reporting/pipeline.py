"""``reporting``: evaluations + layer reports → MLflow child runs, comparison table, plots."""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.lowrank.solvers import SOLVERS

from .nodes import (
    accuracy_vs_params_figure,
    child_run_record,
    comparison_markdown,
    comparison_table,
    convergence_figure,
    layer_loss_figure,
)

NAMESPACES = ("dense", *SOLVERS)


def _child_run_pipeline(namespace: str) -> Pipeline:
    record = update_wrapper(partial(child_run_record, namespace), child_run_record)
    return Pipeline(
        [
            Node(
                record,
                inputs=[
                    "evaluation_metrics",
                    "params:compression",
                    "params:model",
                    "params:data",
                    "params:seed",
                    "params:refinement",
                ],
                outputs="mlflow_run",
                name="record_child_run",
            )
        ],
        namespace=namespace,
        inputs={"evaluation_metrics": f"{namespace}.evaluation_metrics"},
        parameters={
            "params:compression",
            "params:model",
            "params:data",
            "params:seed",
            "params:refinement",
        },
    )


def create_pipeline(**kwargs) -> Pipeline:
    evaluations = {namespace: f"{namespace}.evaluation_metrics" for namespace in NAMESPACES}
    layer_reports = {solver: f"{solver}.layer_report" for solver in SOLVERS}
    summary = Pipeline(
        [
            Node(
                comparison_table,
                inputs=evaluations,
                outputs="comparison_table",
                name="comparison_table",
            ),
            Node(
                comparison_markdown,
                inputs=["comparison_table", "params:compression"],
                outputs="comparison_markdown",
                name="comparison_markdown",
            ),
            Node(
                accuracy_vs_params_figure,
                inputs="comparison_table",
                outputs="accuracy_vs_params_plot",
                name="accuracy_vs_params_plot",
            ),
            Node(
                layer_loss_figure,
                inputs=layer_reports,
                outputs="layer_loss_plot",
                name="layer_loss_plot",
            ),
            Node(
                convergence_figure,
                inputs={"reporting": "params:reporting", **layer_reports},
                outputs="convergence_plot",
                name="convergence_plot",
            ),
        ]
    )
    return sum((_child_run_pipeline(namespace) for namespace in NAMESPACES), summary)
