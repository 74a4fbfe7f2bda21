"""``map_groups`` on a Dask cluster: each group of layers is one task (``compression.parallel:
tcp://host:8786``), results in order.

Same groups, same code, same seeds, so the results of the serial run, as long as each task runs
with the caller's torch thread count (CPU reductions round differently with another) on the same
kind of device. A group's tensors travel on the CPU through Dask's own serialization, scattered
straight to a worker. From inside a Dask task (a node run on a worker) the worker's own client is
used and the task leaves the worker's thread pool while it waits, so nested fan-outs cannot
deadlock one-thread workers. ``distributed`` is imported only when a group is mapped.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Clients this process opened, by address (a handshake each; a model's solves and curves reuse
#: one). Closed by :func:`close_clients`.
_CLIENTS: dict[str, Any] = {}
_LOCK = threading.Lock()


def dask_map(address: str) -> Callable[..., list[Any]]:
    """A ``map``-like callable that runs ``function(*job)`` for each job as a task on the Dask
    scheduler at ``address``; a task that fails raises its own exception here."""

    def map_groups(function: Callable[..., Any], *iterables: Any) -> list[Any]:
        jobs = [_on_cpu(job) for job in zip(*iterables, strict=True)]
        if not jobs:
            return []
        threads = torch.get_num_threads()
        with _client(address) as client:
            payloads = client.scatter(jobs, hash=False)
            futures = [
                client.submit(_run, function, threads, payload, pure=False) for payload in payloads
            ]
            try:
                return client.gather(futures)
            finally:
                client.cancel([*futures, *payloads])

    return map_groups


def _run(function: Callable[..., Any], threads: int, job: tuple) -> Any:
    return call_with_threads(function, threads, *job)


def call_with_threads(function: Callable[..., Any], threads: int, *args: Any) -> Any:
    """``function(*args)`` with ``threads`` torch threads, then the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(previous)


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    return value


@contextlib.contextmanager
def _client(address: str) -> Iterator[Any]:
    import distributed

    try:
        distributed.get_worker()
    except ValueError:
        pass
    else:
        with distributed.worker_client() as client:
            yield client
        return
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
    yield client


def close_clients() -> None:
    """Close the clients this process opened."""
    with _LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.close()
