"""``svd_risk``: fine-tuned model + Fisher + calibration statistics (A, G) → per-layer risk table,
per-model summary, heatmap."""

from kedro.pipeline import Node, Pipeline

from .nodes import compute_layer_risk, plot_risk_heatmap, summarize_risk


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                compute_layer_risk,
                inputs=[
                    "fine_tuned_model",
                    "fisher_information",
                    "calibration_statistics",
                    "params:svd_risk",
                    "params:compression",
                    "params:device",
                ],
                outputs="layer_risk",
                name="compute_layer_risk",
                tags=["reporting"],
            ),
            Node(
                summarize_risk,
                inputs=["layer_risk", "params:svd_risk"],
                outputs="risk_summary",
                name="summarize_risk",
                tags=["reporting"],
            ),
            Node(
                plot_risk_heatmap,
                inputs=["layer_risk", "params:svd_risk"],
                outputs="risk_heatmap",
                name="plot_risk_heatmap",
                tags=["reporting"],
            ),
        ]
    )
