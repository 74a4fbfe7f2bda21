"""``map_groups`` on a Dask cluster (``compression.parallel: tcp://host:8786``): each group of
layers is one task, with the serial run's results (each task runs with the caller's torch thread
count). Tensors travel on the CPU; inside a Dask task the worker's client is used and the task
leaves the pool while it waits, so nested fan-outs cannot deadlock one-thread workers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from weighted_lowrank.lowrank.devices import torch_threads

#: This process's clients by address (a handshake each; a model's solves and curves reuse one).
_CLIENTS: dict[str, Any] = {}
_LOCK = threading.Lock()


def dask_map(address: str) -> Callable[..., list[Any]]:
    """``map`` running each ``function(*job)`` as a task on the scheduler at ``address``."""

    def map_groups(function: Callable[..., Any], *iterables: Any) -> list[Any]:
        import distributed

        jobs = [_on_cpu(job) for job in zip(*iterables, strict=True)]
        threads = torch.get_num_threads()
        try:
            distributed.get_worker()
        except ValueError:
            return _gather(_client(address), function, threads, jobs)
        with distributed.worker_client() as client:
            return _gather(client, function, threads, jobs)

    return map_groups


def _gather(client: Any, function: Callable[..., Any], threads: int, jobs: list) -> list[Any]:
    payloads = client.scatter(jobs, hash=False)
    futures = [client.submit(_run, function, threads, job, pure=False) for job in payloads]
    try:
        return client.gather(futures)
    finally:
        client.cancel([*futures, *payloads])


def _run(function: Callable[..., Any], threads: int, job: tuple) -> Any:
    """``function(*job)`` on the worker with the caller's torch thread count."""
    with torch_threads(threads):
        return function(*job)


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    return value


def _client(address: str) -> Any:
    import distributed

    with _LOCK:
        client = _CLIENTS.get(address)
        if client is None or client.status not in ("running", "connecting", "newly-created"):
            try:
                client = _CLIENTS[address] = distributed.Client(address, set_as_default=False)
            except OSError as error:
                raise ValueError(
                    f"no Dask scheduler answers at {address!r} ({error}); start one with "
                    "`dask scheduler` and workers with `dask worker <address>` (docs/CLUSTER.md), "
                    "or set compression.parallel to serial"
                ) from error
        return client


def close_clients() -> None:
    """Close the clients this process opened."""
    with _LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.close()
