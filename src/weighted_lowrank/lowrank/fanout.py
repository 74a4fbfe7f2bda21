"""Fan groups of layers out to a Dask cluster (``compression.dask_address``), results in order.

:func:`~weighted_lowrank.lowrank.solvers.factorize_batch` and
:func:`~weighted_lowrank.lowrank.solvers.rank_loss_curves` split their layers into groups (same
shape, and rank for the solves) and run one function per group; given a scheduler address they
run those functions as Dask tasks instead (:func:`fan_out`) — same groups, same code, same
seeds, so the same results, as long as the workers run with the caller's torch thread count
(every task does: CPU reductions round differently with another thread count) and on the same
kind of device.

The tensors travel in memory through Dask's own serialization (no files); each group's inputs are
scattered straight to a worker, which runs the group there and returns its results. Called from
inside a task of the same cluster (a node that :class:`~weighted_lowrank.kedro_glue.runner.DaskRunner`
runs on a worker), the fan-out uses that worker's client and leaves the worker's thread pool
while it waits, so nested fan-outs cannot deadlock a cluster of one-thread workers.

Dask is imported only when an address is given: the sequential path needs none of it.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

#: Clients this process opened, by scheduler address (opening one costs a connection handshake;
#: a model's solves and curves reuse it). Closed by :func:`close_clients` or at exit.
_CLIENTS: dict[str, Any] = {}
_LOCK = threading.Lock()


def fan_out(
    address: str, function: Callable[..., Any], jobs: Sequence[tuple], *, name: str
) -> list[Any]:
    """``[function(*job) for job in jobs]``, each call a task on the Dask cluster at ``address``.

    Each job's arguments (tensors, lists, dicts, …) are scattered to a worker, the call runs
    there with this process's torch thread count, and the results come back in job order. A
    task that fails raises its own exception here. ``name`` prefixes the task keys (what the
    Dask dashboard shows).
    """
    if not jobs:
        return []
    threads = torch.get_num_threads()
    with dask_client(address) as client:
        payloads = client.scatter(list(jobs), hash=False)
        token = uuid.uuid4().hex[:8]
        futures = [
            client.submit(
                _run_job,
                function,
                threads,
                payload,
                key=f"{name}-{index}-{token}",
                pure=False,
            )
            for index, payload in enumerate(payloads)
        ]
        try:
            return client.gather(futures)
        finally:
            client.cancel([*futures, *payloads])


def _run_job(function: Callable[..., Any], threads: int, job: tuple) -> Any:
    return call_with_threads(function, threads, *job)


def call_with_threads(function: Callable[..., Any], threads: int, *args: Any) -> Any:
    """``function(*args)`` with ``threads`` torch threads (the caller's), then the previous count.

    Torch's CPU reductions split work by thread, so the same inputs round differently with
    another thread count; a task that uses the submitting process's count computes what that
    process would have.
    """
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        return function(*args)
    finally:
        if previous != threads:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A ``distributed.Client`` of the scheduler at ``address``.

    Inside a Dask task of that scheduler: the worker's client, with the task seceded from the
    worker's thread pool while the block runs (``distributed.worker_client``). Elsewhere: a client
    this process keeps per address (not made the process's default client).
    """
    import distributed
    from distributed.comm.addressing import normalize_address

    if not isinstance(address, str) or not address:
        raise ValueError(
            f"dask address must be a scheduler address such as tcp://host:8786, got {address!r}"
        )
    wanted = normalize_address(address if "://" in address else f"tcp://{address}")
    try:
        worker = distributed.get_worker()
    except ValueError:
        worker = None
    if worker is not None and normalize_address(worker.scheduler.address) == wanted:
        with distributed.worker_client() as client:
            yield client
        return
    with _LOCK:
        client = _CLIENTS.get(wanted)
        if client is None or client.status not in ("running", "connecting", "newly-created"):
            try:
                client = distributed.Client(wanted, set_as_default=False)
            except OSError as error:
                raise ValueError(
                    f"no Dask scheduler answers at {address!r} ({error}); start one with "
                    "`dask scheduler` and workers with `dask worker <address>` (docs/CLUSTER.md), "
                    "or set compression.dask_address to null"
                ) from error
            _CLIENTS[wanted] = client
    yield client


def close_clients() -> None:
    """Close the clients :func:`dask_client` opened in this process."""
    with _LOCK:
        clients = list(_CLIENTS.values())
        _CLIENTS.clear()
    for client in clients:
        client.close()
