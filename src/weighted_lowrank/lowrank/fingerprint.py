"""A short content hash that identifies a model's weights (lineage of derived datasets)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the model's state dict (hex, 16 chars)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{values.dtype}|{tuple(values.shape)}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()[:16]
