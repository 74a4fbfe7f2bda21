"""Custom Kedro datasets: a versioned Hugging Face model directory and a safetensors tensor dict."""

from weighted_lowrank.datasets.hf_model_dataset import HFModelDataset
from weighted_lowrank.datasets.safetensors_dataset import SafetensorsDataset

__all__ = ["HFModelDataset", "SafetensorsDataset"]
