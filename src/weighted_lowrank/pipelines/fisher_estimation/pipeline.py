"""``fisher_estimation``: fine-tuned model + train split → Fisher tensors and calibration
statistics (versioned safetensors), from one pass."""

from kedro.pipeline import Node, Pipeline

from .nodes import estimate_fisher, select_fisher_examples


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                select_fisher_examples,
                inputs=["train_split", "params:fisher_estimation", "params:seed"],
                outputs="fisher_examples",
                name="select_fisher_examples",
                tags=["feature"],
            ),
            Node(
                estimate_fisher,
                ["fine_tuned_model", "fisher_examples"]
                + ["params:fisher_estimation", "params:model", "params:device"],
                ["fisher_information", "calibration_statistics", "fisher_estimation_metrics"],
                name="estimate_fisher",
                tags=["feature"],
            ),
        ]
    )
