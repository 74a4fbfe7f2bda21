"""``risk_validation``: per-layer damage of SVD vs the weighted solver, correlated with the risk table."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    WEIGHTED_SOLVER,
    measure_layer_damage,
    plot_risk_validation,
    risk_validation_metrics,
    summarize_risk_validation,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                measure_layer_damage,
                inputs=[
                    "fine_tuned_model",
                    "svd.compressed_model",
                    f"{WEIGHTED_SOLVER}.compressed_model",
                    "validation_split",
                    "layer_risk",
                    "params:model",
                    "params:risk_validation",
                    "params:device",
                ],
                outputs="risk_validation_table",
                name="measure_layer_damage",
                tags=["reporting"],
            ),
            Node(
                summarize_risk_validation,
                inputs=["risk_validation_table", "params:risk_validation"],
                outputs="risk_validation_summary",
                name="summarize_risk_validation",
                tags=["reporting"],
            ),
            Node(
                risk_validation_metrics,
                inputs="risk_validation_summary",
                outputs="risk_validation_metrics",
                name="risk_validation_metrics",
                tags=["reporting"],
            ),
            Node(
                plot_risk_validation,
                inputs=["risk_validation_table", "risk_validation_summary"],
                outputs="risk_validation_plot",
                name="plot_risk_validation",
                tags=["reporting"],
            ),
        ]
    )
