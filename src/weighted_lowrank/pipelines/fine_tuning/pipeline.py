"""``fine_tuning``: base model + train/validation splits → fine-tuned model (HF directory)."""

from kedro.pipeline import Node, Pipeline

from .nodes import fine_tune, initialise_model


def create_pipeline(**kwargs) -> Pipeline:
    base = ["params:model", "label_names", "params:fine_tuning", "params:seed"]
    data = ["base_model", "train_split", "validation_split"]
    parameters = ["params:model", "params:fine_tuning", "params:seed", "params:device"]
    outputs = ["fine_tuned_model", "fine_tuning_metrics"]
    return Pipeline(
        [
            Node(
                initialise_model, base, "base_model", name="initialise_model", tags=["model_input"]
            ),
            Node(fine_tune, data + parameters, outputs, name="fine_tune"),
        ]
    )
