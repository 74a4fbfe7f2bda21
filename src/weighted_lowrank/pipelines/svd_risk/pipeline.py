"""``svd_risk``: fine-tuned model + Fisher + calibration statistics (A, G) → per-layer risk table,
per-model summary, heatmap."""

from kedro.pipeline import Node, Pipeline

from .nodes import compute_layer_risk, plot_risk_heatmap, summarize_risk


def create_pipeline(**kwargs) -> Pipeline:
    data = ["fine_tuned_model", "fisher_information", "calibration_statistics"]
    risk_inputs = data + ["params:svd_risk", "params:compression", "params:device"]
    table = ["layer_risk", "params:svd_risk"]
    return Pipeline(
        [
            Node(compute_layer_risk, risk_inputs, "layer_risk", name="compute_layer_risk"),
            Node(summarize_risk, table, "risk_summary", name="summarize_risk"),
            Node(plot_risk_heatmap, table, "risk_heatmap", name="plot_risk_heatmap"),
        ],
        tags=["reporting"],
    )
