"""One rule for turning a configured device into a ``torch.device``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Result = TypeVar("Result")


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


def batched_eigvalsh(matrices: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh`` of a batch, on one CPU thread (any thread count on CUDA).

    A CPU batch of small symmetric eigenproblems is solved one LAPACK call per matrix; extra
    threads only add a fork/join per call, which with ``OMP_WAIT_POLICY=PASSIVE`` (or busy
    cores) made 24 eigensolves of 384 × 384 take 2.7 s instead of 0.2 s on one thread
    (docs/BENCHMARKS.md, "Loss curves and allocation").
    """
    return on_one_cpu_thread(torch.linalg.eigvalsh, matrices)


def batched_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a batch, on one CPU thread (see :func:`batched_eigvalsh`)."""
    return on_one_cpu_thread(torch.linalg.eigh, matrices)


def on_one_cpu_thread(function: Callable[[torch.Tensor], Result], matrices: torch.Tensor) -> Result:
    """``function(matrices)`` with torch on one thread when ``matrices`` are on the CPU (a batch of
    small LAPACK calls, or small ops that only pay fork/joins for more threads)."""
    if matrices.device.type != "cpu" or torch.get_num_threads() == 1:
        return function(matrices)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(matrices)
    finally:
        torch.set_num_threads(threads)
