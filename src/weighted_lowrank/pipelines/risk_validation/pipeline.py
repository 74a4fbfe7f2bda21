"""``risk_validation``: per-layer and whole-model damage of each validated solver, set against
the risk statistics of ``layer_risk`` and against each loss model's prediction."""

from kedro.pipeline import Node, Pipeline

from .loss_model_nodes import loss_model_metrics, plot_loss_models, summarize_loss_models
from .nodes import (
    VALIDATED_SOLVERS,
    measure_layer_damage,
    plot_risk_validation,
    risk_validation_metrics,
    summarize_risk_validation,
)


def create_pipeline(**kwargs) -> Pipeline:
    # Every solver that risk_validation.solvers may name is wired in (and loaded): the parameter
    # is read only when the node runs.
    compressed_models = {solver: f"{solver}.compressed_model" for solver in VALIDATED_SOLVERS}
    return Pipeline(
        [
            Node(
                measure_layer_damage,
                inputs={
                    "fine_tuned_model": "fine_tuned_model",
                    "validation_split": "validation_split",
                    "layer_risk": "layer_risk",
                    "fisher_information": "fisher_information",
                    "calibration_statistics": "calibration_statistics",
                    "model": "params:model",
                    "risk_validation": "params:risk_validation",
                    "device": "params:device",
                    **compressed_models,
                },
                outputs=["risk_validation_table", "loss_model_table"],
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
            Node(
                summarize_loss_models,
                inputs=["loss_model_table", "risk_validation_table"],
                outputs="loss_model_summary",
                name="summarize_loss_models",
                tags=["reporting"],
            ),
            Node(
                loss_model_metrics,
                inputs="loss_model_summary",
                outputs="loss_model_metrics",
                name="loss_model_metrics",
                tags=["reporting"],
            ),
            Node(
                plot_loss_models,
                inputs=["loss_model_table", "loss_model_summary"],
                outputs="loss_model_plot",
                name="plot_loss_models",
                tags=["reporting"],
            ),
        ]
    )
