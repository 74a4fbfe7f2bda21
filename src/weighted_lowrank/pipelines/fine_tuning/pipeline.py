"""``fine_tuning``: base model + train/validation splits → fine-tuned model (HF directory)."""

from kedro.pipeline import Node, Pipeline

from .nodes import fine_tune, initialise_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                initialise_model,
                inputs=["params:model", "label_names", "params:fine_tuning", "params:seed"],
                outputs="base_model",
                name="initialise_model",
                tags=["model_input"],
            ),
            Node(
                fine_tune,
                ["base_model", "train_split", "validation_split"]
                + ["params:model", "params:fine_tuning", "params:seed", "params:device"],
                ["fine_tuned_model", "fine_tuning_metrics"],
                name="fine_tune",
            ),
        ]
    )
