"""``DaskRunner``: a pipeline's nodes as Dask tasks, MLflow logging kept in this process."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import uuid
import warnings
from typing import Any

import torch
from distributed import Client, LocalCluster, as_completed
from distributed.versions import VersionMismatchWarning
from kedro.framework.hooks.markers import HOOK_NAMESPACE
from kedro.framework.hooks.specs import DatasetSpecs, NodeSpecs
from kedro.framework.project import settings
from kedro.io import AbstractDataset, DataCatalog, MemoryDataset
from kedro.pipeline import Node
from kedro.runner import AbstractRunner, Task
from pluggy import PluginManager

CHECKED_PACKAGES = ("weighted-lowrank", "kedro", "torch", "transformers")
logger = logging.getLogger(__name__)


class DaskRunner(AbstractRunner):
    """Runs each node as a task on a Dask cluster; MLflow logging stays in this process.

    Kedro's Dask deployment shape: every node is submitted at once as a task whose arguments are
    the futures of what it depends on, and Dask orders the work. Outputs equal
    ``SequentialRunner``'s but for wall-clock fields (docs/CLUSTER.md).

    ``address``: the scheduler, e.g. ``tcp://10.0.0.5:8786``; default ``DASK_SCHEDULER_ADDRESS``,
    and without it a ``LocalCluster(**cluster)`` for the run (``n_workers``, ``threads_per_worker``
    1 by default). ``worker_hooks`` run on the worker with each node (default ``settings.HOOKS``),
    the session's other hooks here. ``worker_timeout``: seconds to wait for the first worker.
    """

    def __init__(
        self, address=None, worker_hooks=None, worker_timeout=60.0, is_async=False, **cluster
    ):
        super().__init__(is_async=is_async)
        self.address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self.cluster = {"threads_per_worker": 1, **cluster}
        self.worker_hooks = None if worker_hooks is None else tuple(worker_hooks)
        self.worker_timeout, self.is_async = worker_timeout, is_async

    def _get_executor(self, max_workers: int) -> None:
        return None  # AbstractRunner's abstract method; Dask schedules the nodes

    def _run(self, pipeline, catalog, hook_manager=None, run_id=None) -> None:
        with contextlib.ExitStack() as stack:
            address = self.address
            if address is None:
                cluster = LocalCluster(processes=True, dashboard_address=":0", **self.cluster)
                address = stack.enter_context(cluster).scheduler_address
                logger.info("Started a Dask LocalCluster at %s", address)
            try:
                client = stack.enter_context(Client(address, set_as_default=False))
                client.wait_for_workers(1, timeout=self.worker_timeout)
            except OSError as error:  # TimeoutError included
                raise RuntimeError(
                    f"no Dask scheduler with workers answers at {address!r} ({error}); start "
                    "`dask scheduler` and `dask worker <address>` (docs/CLUSTER.md)"
                ) from error
            with warnings.catch_warnings():  # Dask's table of differing versions stops the run
                warnings.simplefilter("error", VersionMismatchWarning)
                client.get_versions(check=True, packages=CHECKED_PACKAGES)
            self.hooks = tuple(settings.HOOKS) if self.worker_hooks is None else self.worker_hooks
            self.client, self.pipeline, self.run_id = client, pipeline, run_id
            self.catalog = catalog
            self.manager = hook_manager if isinstance(hook_manager, PluginManager) else None
            kinds = {type(hook) for hook in self.hooks}
            plugins = self.manager.get_plugins() if self.manager else []
            self.removed = [plugin for plugin in plugins if type(plugin) in kinds]
            names = pipeline.datasets()
            self.datasets = {n: catalog.get(n, fallback_to_runtime_pattern=True) for n in names}
            self.places = {name: dataset_place(dataset) for name, dataset in self.datasets.items()}
            # Saved here: the MLflow datasets, and the in-memory free outputs runner.run returns.
            free = {name for name in pipeline.outputs() if self.places[name] == "memory"}
            self.saved_here = free | {n for n, place in self.places.items() if place == "driver"}
            self.futures: dict[Node, Any] = {}  # of the nodes not collected yet
            self.token = uuid.uuid4().hex[:8]  # in every task key: runs sharing a cluster never mix
            self.execute()

    def hook(self, hook: str, node: Node, **kwargs: Any) -> None:
        """The session's node hook ``hook`` but the worker hooks, shown the inputs held here."""
        if self.manager is not None:
            kwargs.update(catalog=self.catalog, is_async=self.is_async, run_id=self.run_id)
            inputs = {name: self.held[name] for name in node.inputs if name in self.held}
            self.manager.subset_hook_caller(hook, self.removed)(node=node, inputs=inputs, **kwargs)

    def submit(self, node: Node) -> None:
        """Submit ``node`` with the futures of the nodes before it (and of the driver's inputs)."""
        datasets = {n: self.datasets[n] for n in node.outputs if self.places[n] == "worker"}
        if (parameters := self.catalog.get("parameters")) is not None:  # the lineage check's
            datasets["parameters"] = parameters
        received = {}
        for name in node.inputs:
            if self.places[name] == "worker":
                datasets[name] = self.datasets[name]
                continue
            # An empty copy of a memory dataset, so its copy mode applies on the worker.
            memory = self.places[name] == "memory"
            datasets[name] = copy.copy(self.datasets[name]) if memory else MemoryDataset()
            datasets[name].release()
            received[name] = self.sources[name]
        self.hook("before_node_run", node)
        returned = [name for name in node.outputs if self.places[name] != "worker"]
        task = (node, datasets, returned, self.hooks, self.run_id, self.is_async)
        after = [self.futures[upstream] for upstream in self.pipeline.node_dependencies[node]]
        key, threads = f"{node.name}-{self.token}", torch.get_num_threads()
        self.futures[node] = self.client.submit(run_node, task, threads, received, *after, key=key)
        self.sources.update(dict.fromkeys(returned, self.futures[node]))

    def execute(self) -> None:
        """Submit every node, then collect each as Dask finishes it."""
        inputs = [name for name in self.pipeline.inputs() if self.places[name] != "worker"]
        self.held = {name: self.catalog.load(name) for name in inputs}  # shown to driver hooks
        # Sources of in-memory inputs: a node's future (its outputs), or the driver's inputs
        # scattered once. Dropped once all is submitted: Dask frees what no task still needs.
        self.sources = dict.fromkeys(inputs, self.client.scatter([self.held], hash=False)[0])
        for node in self.pipeline.nodes:
            self.submit(node)
        self.sources.clear()
        nodes, done = {future.key: node for node, future in self.futures.items()}, set()
        try:
            for future in as_completed(list(self.futures.values()), loop=self.client.loop):
                node = nodes[future.key]
                if future.status != "finished":
                    node, error = self.culprit(node), future.exception()
                    self.hook("on_node_error", node, error=error)
                    raise error
                self.collect(node)
                done.add(node)
                logger.info("Completed node %s (%d of %d)", node.name, len(done), len(nodes))
        except BaseException:
            self.client.cancel(list(self.futures.values()))
            logger.warning("Not run: %s", [n.name for n in nodes.values() if n not in done])
            raise

    def culprit(self, node: Node) -> Node:
        """``node``, or the upstream node whose error Dask passed on to it."""
        for upstream in self.pipeline.node_dependencies[node]:
            if upstream in self.futures and self.futures[upstream].status == "error":
                return self.culprit(upstream)
        return node

    def collect(self, node: Node) -> None:
        """Save here what the driver keeps of a finished node, then run the after-node hooks."""
        future, values = self.futures.pop(node), {}
        if kept := [name for name in node.outputs if name in self.saved_here]:
            picked = self.client.submit(pick, future, kept, key=f"kept-{future.key}")
            values = dict(zip(kept, picked.result(), strict=True))
        for name, value in values.items():
            self.catalog.save(name, value)
        for name in node.outputs:
            if self.places[name] == "worker":
                self.datasets[name].release()  # a worker saved a new version: no cached old one
        self.hook("after_node_run", node, outputs=values)


def run_node(task: tuple, threads: int, received: dict[str, Any], *after: Any) -> dict[str, Any]:
    """On a worker: run a node as Kedro's ``Task`` with ``threads`` torch threads, its in-memory
    inputs taken from the ``received`` outputs of nodes; the values of its ``returned`` outputs.
    ``after``: the outputs of the nodes before it, there for Dask's ordering."""
    node, datasets, returned, hooks, run_id, is_async = task
    catalog = DataCatalog({**datasets, **{n: MemoryDataset(copy_mode="assign") for n in returned}})
    for name, outputs in received.items():
        catalog.save(name, outputs[name])
    manager = PluginManager(HOOK_NAMESPACE)
    manager.add_hookspecs(NodeSpecs)
    manager.add_hookspecs(DatasetSpecs)
    for hook in hooks:
        manager.register(hook)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Task(node, catalog, is_async, manager, run_id).execute()
    finally:
        torch.set_num_threads(previous)
    return {name: catalog.load(name) for name in returned}


def pick(outputs: dict[str, Any], names: list[str]) -> list[Any]:
    return [outputs[name] for name in names]


def dataset_place(dataset: AbstractDataset) -> str:
    """``memory``: a ``MemoryDataset``, its data kept in the cluster. ``driver``: logs to MLflow
    (a kedro_mlflow class, or "mlflow" in its class name), loaded and saved here, where the MLflow
    run is. ``worker``: any other (a file dataset), loaded and saved by the worker."""
    if isinstance(dataset, MemoryDataset):
        return "memory"
    names = [(kind.__module__, kind.__name__.lower()) for kind in type(dataset).__mro__]
    if any(module.startswith("kedro_mlflow") or "mlflow" in name for module, name in names):
        return "driver"
    return "worker"
