"""Custom Kedro datasets: versioned HF model directory, safetensors tensor dict, MLflow child run."""

from weighted_lowrank.datasets.hf_model_dataset import HFModelDataset
from weighted_lowrank.datasets.mlflow_child_run import MlflowChildRunDataset
from weighted_lowrank.datasets.safetensors_dataset import SafetensorsDataset

__all__ = ["HFModelDataset", "MlflowChildRunDataset", "SafetensorsDataset"]
