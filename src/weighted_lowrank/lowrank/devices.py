"""One rule for turning a configured device into a ``torch.device``."""

from __future__ import annotations

import torch


def resolve_device(
    device: str | torch.device | None, fallback: torch.device | None = None
) -> torch.device:
    """``None`` → ``fallback`` (CPU if none); ``"auto"`` → CUDA when available, else CPU;
    anything else verbatim, checked: a malformed name or CUDA without a GPU is a ``ValueError``.
    """
    if device is None:
        return fallback if fallback is not None else torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {device!r} is not a torch device; expected cpu, cuda or auto"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use cpu or auto")
    return resolved
