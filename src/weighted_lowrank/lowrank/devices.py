"""Where torch work runs: one rule for turning a configured device into a ``torch.device``, and
how small batched CPU work uses the threads (one torch thread per call, split between workers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

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
    """``torch.linalg.eigvalsh`` of a batch, one torch thread per CPU call (:func:`split_batch`):
    extra threads only add a fork/join per small LAPACK call, 2.7 s instead of 0.2 s for 24
    eigensolves of 384 × 384 (docs/BENCHMARKS.md, "Loss curves and allocation")."""
    return split_batch(torch.linalg.eigvalsh, matrices)


def batched_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a batch, one torch thread per CPU call (see :func:`batched_eigvalsh`)."""
    return split_batch(torch.linalg.eigh, matrices)


def on_one_cpu_thread(function: Callable[[torch.Tensor], Result], matrices: torch.Tensor) -> Result:
    """``function(matrices)`` with torch on one thread when ``matrices`` are on the CPU (a batch of
    small LAPACK calls, or small ops that only pay fork/joins for more threads)."""
    if matrices.device.type != "cpu" or torch.get_num_threads() == 1:
        return function(matrices)
    with torch_threads(1):
        return function(matrices)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch on ``count`` threads inside the block; the caller's count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: Worker threads that share small batched CPU work in this context (:func:`worker_threads`).
_THREADS: ContextVar[int] = ContextVar("worker_threads", default=1)
_WORKER_POOL: ThreadPoolExecutor | None = None


@contextmanager
def worker_threads(threads: int) -> Iterator[None]:
    """Inside the block, small batched CPU work is split between ``threads`` workers on one torch
    thread each (``compression.parallel: threads``): they beat OpenMP threads that sleep between
    small ops (docs/BENCHMARKS.md, "tfwsvd timing"). Only sums over chunks round differently."""
    token = _THREADS.set(threads)
    try:
        yield
    finally:
        _THREADS.reset(token)


def cpu_workers(device: torch.device) -> int:
    """How many worker threads :func:`run_on_workers` uses on ``device`` (1 off the CPU)."""
    return _THREADS.get() if device.type == "cpu" else 1


def run_on_workers(tasks: list[Callable[[], Result]]) -> list[Result]:
    """Run ``tasks`` concurrently, each on one torch thread (the caller's runs the first);
    results in order."""
    if len(tasks) == 1:
        return [tasks[0]()]
    global _WORKER_POOL
    if _WORKER_POOL is None or _WORKER_POOL._max_workers < len(tasks) - 1:  # noqa: SLF001
        _WORKER_POOL = ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="solver")
    with torch_threads(1):
        futures = [_WORKER_POOL.submit(_on_one_thread, task) for task in tasks[1:]]
        first = tasks[0]()
        return [first, *(future.result() for future in futures)]


def _on_one_thread(task: Callable[[], Result]) -> Result:
    torch.set_num_threads(1)  # this thread's own OpenMP setting
    return task()


def split_batch(function: Callable[..., Any], matrices: torch.Tensor) -> Any:
    """``function(matrices)`` for a batched LAPACK ``function`` (eigh, Cholesky, …), on one torch
    thread per worker, the batch split between :func:`cpu_workers` workers. Each matrix is solved
    alone, so the result does not depend on the split."""
    workers = min(cpu_workers(matrices.device), matrices.shape[0])
    if workers <= 1:
        return on_one_cpu_thread(function, matrices)
    parts = torch.tensor_split(matrices, workers)
    results = run_on_workers([lambda part=part: function(part) for part in parts])
    if isinstance(results[0], torch.Tensor):
        return torch.cat(results)
    return type(results[0])(torch.cat(items) for items in zip(*results, strict=True))
