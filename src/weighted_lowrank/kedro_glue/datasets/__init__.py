"""Custom Kedro datasets: versioned HF model directory, safetensors tensor dict, MLflow child run."""

from weighted_lowrank.kedro_glue.datasets.hf_model_dataset import HFModelDataset
from weighted_lowrank.kedro_glue.datasets.mlflow_child_run import MlflowChildRunDataset
from weighted_lowrank.kedro_glue.datasets.safetensors_dataset import SafetensorsDataset

__all__ = ["HFModelDataset", "MlflowChildRunDataset", "SafetensorsDataset"]
