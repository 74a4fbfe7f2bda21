"""``fisher_estimation``: fine-tuned model + train split → Fisher tensors and calibration
statistics (versioned safetensors), from one pass."""

from kedro.pipeline import Node, Pipeline

from .nodes import estimate_fisher, select_fisher_examples


def create_pipeline(**kwargs) -> Pipeline:
    select = ["train_split", "params:fisher_estimation", "params:seed"]
    data = ["fine_tuned_model", "fisher_examples"]
    parameters = ["params:fisher_estimation", "params:model", "params:device"]
    outputs = ["fisher_information", "calibration_statistics", "fisher_estimation_metrics"]
    return Pipeline(
        [
            Node(select_fisher_examples, select, "fisher_examples", name="select_fisher_examples"),
            Node(estimate_fisher, data + parameters, outputs, name="estimate_fisher"),
        ],
        tags=["feature"],
    )
