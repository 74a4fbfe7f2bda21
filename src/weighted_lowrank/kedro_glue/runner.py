"""``DaskRunner``: run a pipeline's nodes as tasks on a Dask cluster, logging stays here.

Usage::

    kedro run --runner weighted_lowrank.kedro_glue.runner.DaskRunner                       # a LocalCluster
    kedro run --runner weighted_lowrank.kedro_glue.runner.DaskRunner \\
        --runner-params address=tcp://10.0.0.5:8786                              # a running cluster
    DASK_SCHEDULER_ADDRESS=tcp://10.0.0.5:8786 kedro run --runner weighted_lowrank.kedro_glue.runner.DaskRunner

It follows Kedro's Dask deployment guide (docs.kedro.org, "Dask"): one Dask task per node, each
submitted once the nodes it depends on are done, so independent nodes — the solver namespaces of
``factorization`` and ``evaluation``, the members of a sweep — run at the same time on different
workers. Three things differ from the guide's runner, for this project's MLflow tracking and
in-memory datasets (docs/CLUSTER.md):

- **Where data lives.** Every dataset of the pipeline has one of three places
  (:func:`dataset_place`). ``worker``: file datasets (Parquet, JSON, safetensors, the model
  directories, versioned or not) are shipped to the task as dataset objects and loaded and saved
  by the worker itself — the versioned catalog on the shared file system is the storage, so every
  worker must mount the project's ``data/`` at the driver's path. ``memory``: ``MemoryDataset``
  (parameters, unregistered intermediates) lives in the cluster's memory — a node's in-memory
  output stays on its worker as a Dask result and goes straight to the workers of its consumers,
  loaded there with the dataset's copy mode; the driver only gets the pipeline's free outputs.
  ``driver``: datasets that log to MLflow (kedro-mlflow's, :class:`MlflowChildRunDataset`),
  single-process and unpicklable ones are loaded and saved here, in the driver: the worker
  returns the value, the driver saves it.
- **Hooks.** The project's hooks (``settings.HOOKS``: ``LineageCheck`` needs a node's real inputs)
  run on the worker with the node; every other hook — kedro-mlflow's — runs here: its
  ``before_node_run`` sees the inputs the driver holds (parameters, driver datasets), which is all
  it logs, and the MLflow run that kedro-mlflow opened stays in this process. Pipeline hooks are
  the session's, here, as always.
- **Results.** Each task runs with the driver's torch thread count (CPU reductions round
  differently with another one), so a node gives the same outputs as under ``SequentialRunner``
  — up to its wall-clock fields.

A worker needs the same environment as the driver: the project package and its dependencies
installed (checked: the versions of weighted-lowrank, kedro, torch and transformers must match),
and every file input the driver sees (checked). Without an address, the runner starts a
``LocalCluster`` of ``n_workers`` processes with ``threads_per_worker`` threads for the run and
closes it after.
"""

from __future__ import annotations

import operator
import os
import uuid
from collections import Counter
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import cloudpickle
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import AbstractDataset, CatalogProtocol, DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.pipeline.node import Node
from kedro.runner import AbstractRunner
from kedro.runner.task import Task
from pluggy import PluginManager

#: Where a dataset is loaded and saved (see :func:`dataset_place`).
PLACES = ("worker", "memory", "driver")
#: Packages whose versions every worker must share with the driver.
CHECKED_PACKAGES = ("weighted-lowrank", "kedro", "torch", "transformers")
#: Driver-held values larger than this (bytes, Dask's estimate) are scattered to the cluster
#: once instead of travelling inside each task.
SCATTER_BYTES = 1 << 20


class DaskRunner(AbstractRunner):
    """Runs each node as a task on a Dask cluster; MLflow logging stays in this process.

    Args:
        address: the scheduler, e.g. ``tcp://10.0.0.5:8786``; default the environment variable
            ``DASK_SCHEDULER_ADDRESS``, and without it a ``LocalCluster`` started for the run.
        n_workers: worker processes of that LocalCluster (default: Dask's, from the CPU count).
        threads_per_worker: threads per LocalCluster worker.
        worker_hooks: hook instances run on the worker with each node; default
            ``settings.HOOKS`` (the project's). The session's other hooks run in the driver.
        worker_timeout: seconds to wait for the first worker of a running cluster.
        is_async: load and save a node's datasets in threads (on the worker).
    """

    def __init__(
        self,
        address: str | None = None,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        worker_hooks: Iterable[Any] | None = None,
        worker_timeout: float = 60.0,
        is_async: bool = False,
    ) -> None:
        super().__init__(is_async=is_async)
        self._address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self._n_workers = n_workers
        self._threads_per_worker = threads_per_worker
        self._worker_hooks = None if worker_hooks is None else tuple(worker_hooks)
        self._worker_timeout = worker_timeout

    def _get_executor(self, max_workers: int) -> None:
        return None  # the Dask client schedules the nodes (see _run)

    def _run(
        self,
        pipeline: Pipeline,
        catalog: CatalogProtocol,
        hook_manager: PluginManager | None = None,
        run_id: str | None = None,
    ) -> None:
        from distributed import Client, LocalCluster

        cluster = None
        if self._address is None:
            cluster = LocalCluster(
                n_workers=self._n_workers,
                threads_per_worker=self._threads_per_worker,
                processes=True,
                dashboard_address=":0",
            )
            self._logger.info("Started a Dask LocalCluster at %s", cluster.scheduler_address)
        address = self._address or cluster.scheduler_address
        try:
            client = Client(address, set_as_default=False)
        except OSError as error:
            raise RuntimeError(
                f"no Dask scheduler answers at {address!r} ({error}); start one with "
                "`dask scheduler` and workers with `dask worker <address>` (docs/CLUSTER.md)"
            ) from error
        try:
            _PipelineRun(
                runner=self,
                client=client,
                pipeline=pipeline,
                catalog=catalog,
                hook_manager=hook_manager,
                run_id=run_id,
            ).execute()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def worker_hooks(self) -> tuple[Any, ...]:
        """The hook instances each task runs on its worker."""
        if self._worker_hooks is not None:
            return self._worker_hooks
        from kedro.framework.project import settings

        return tuple(settings.HOOKS)


def dataset_place(dataset: AbstractDataset) -> str:
    """``memory``, ``driver`` or ``worker``: where :class:`DaskRunner` loads and saves it.

    ``memory``: a ``MemoryDataset`` (its data lives in the cluster's memory). ``driver``: a
    dataset that logs to MLflow (a class from kedro_mlflow or with "mlflow" in its name) —
    MLflow's active run exists only in the driver — or one Kedro marks single-process or
    ephemeral, or one that cannot be pickled. ``worker``: everything else (file datasets on the
    shared storage).
    """
    if isinstance(dataset, MemoryDataset):
        return "memory"
    if (
        _logs_to_mlflow(dataset)
        or getattr(dataset, "_SINGLE_PROCESS", False)
        or getattr(dataset, "_EPHEMERAL", False)
    ):
        return "driver"
    try:
        cloudpickle.dumps(dataset)
    except Exception:
        return "driver"
    return "worker"


def _logs_to_mlflow(dataset: AbstractDataset) -> bool:
    return any(
        kind.__module__.startswith("kedro_mlflow") or "mlflow" in kind.__name__.lower()
        for kind in type(dataset).__mro__
    )


class _PipelineRun:
    """One pipeline run on a client: the scheduling loop and the driver-side bookkeeping."""

    def __init__(
        self,
        *,
        runner: DaskRunner,
        client: Any,
        pipeline: Pipeline,
        catalog: CatalogProtocol,
        hook_manager: PluginManager | None,
        run_id: str | None,
    ) -> None:
        import torch

        self.runner = runner
        self.client = client
        self.pipeline = pipeline
        self.catalog = catalog
        self.run_id = run_id
        self.is_async = runner._is_async
        self.threads = torch.get_num_threads()
        self.worker_hooks = runner.worker_hooks()
        self.hooks = _DriverHooks(hook_manager, self.worker_hooks)
        self.datasets = {
            name: catalog.get(name, fallback_to_runtime_pattern=True)
            for name in pipeline.datasets()
        }
        self.places = {name: dataset_place(dataset) for name, dataset in self.datasets.items()}
        # Data of memory datasets on the cluster (futures), and their values held here (driver
        # loads, for the driver's hooks); dropped once no node needs them.
        self.remote: dict[str, Any] = {}
        self.local: dict[str, Any] = {}
        self.load_counts = Counter(name for node in pipeline.nodes for name in node.inputs)
        self.token = uuid.uuid4().hex[:8]

    @property
    def logger(self):
        return self.runner._logger

    def execute(self) -> None:
        from distributed import as_completed

        self._check_pipeline()
        self._check_workers()
        nodes = self.pipeline.nodes
        dependencies = self.pipeline.node_dependencies
        todo, done = list(nodes), set()
        running: dict[Any, tuple[Node, dict[str, Any]]] = {}
        completed = as_completed(loop=self.client.loop)
        try:
            while todo or running:
                ready = [node for node in todo if dependencies[node] <= done]
                for node in ready:
                    todo.remove(node)
                    future, inputs = self._submit(node)
                    running[future] = (node, inputs)
                    completed.add(future)
                if not running:
                    raise RuntimeError(
                        f"DaskRunner cannot schedule {[node.name for node in todo]}: their "
                        "inputs are never made"
                    )
                future = next(completed)
                node, inputs = running.pop(future)
                if future.status != "finished":
                    error = future.exception()
                    self.hooks.on_node_error(error, node, self.catalog, inputs, self)
                    raise error
                self._finish(node, future, inputs)
                done.add(node)
                self.logger.info("Completed node: %s", node.name)
                self.logger.info("Completed %d out of %d tasks", len(done), len(nodes))
        except BaseException:
            self.client.cancel(list(running))
            self.runner._suggest_resume_scenario(self.pipeline, done, self.catalog)
            raise
        finally:
            self.remote.clear()
            self.local.clear()

    # ------------------------------------------------------------------ checks

    def _check_pipeline(self) -> None:
        wrong = sorted(
            name
            for node in self.pipeline.nodes
            for name in node.confirms
            if self.places.get(name, "worker") != "worker"
        )
        if wrong:
            raise ValueError(
                f"DaskRunner confirms datasets on the worker that ran the node, but {wrong} are "
                "not file datasets a worker can open; run this pipeline with SequentialRunner"
            )
        try:
            cloudpickle.dumps(self.worker_hooks)
        except Exception as error:
            raise ValueError(
                f"DaskRunner ships the project's hooks {self.worker_hooks} to the workers, but "
                f"they cannot be pickled ({error}); pass worker_hooks=[] or picklable hooks"
            ) from error

    def _check_workers(self) -> None:
        """Workers up, the project's packages at the driver's versions, the file inputs there."""
        try:
            self.client.wait_for_workers(1, timeout=self.runner._worker_timeout)
        except TimeoutError as error:
            raise RuntimeError(
                f"no Dask worker joined the scheduler {self.client.scheduler.address} within "
                f"{self.runner._worker_timeout:g} s; start workers with `dask worker <address>` "
                "(docs/CLUSTER.md)"
            ) from error
        paths = sorted(
            {
                str(path)
                for name in self.pipeline.inputs()
                if self.places[name] == "worker"
                and (path := _local_path(self.datasets[name])) is not None
                and path.exists()
            }
        )
        try:
            reports = self.client.run(_worker_environment, paths)
        except (ImportError, AttributeError) as error:
            raise RuntimeError(
                f"Dask workers cannot import the project ({error}); install it into every "
                "worker's environment (`pip install -e .` in the project, docs/CLUSTER.md)"
            ) from error
        expected = _package_versions()
        problems = []
        for worker, report in sorted(reports.items()):
            differing = {
                package: (version, expected[package])
                for package, version in report["versions"].items()
                if version != expected[package]
            }
            if differing:
                problems.append(
                    f"{worker} has {', '.join(f'{p} {v} (driver: {d})' for p, (v, d) in differing.items())}"
                )
            if report["missing"]:
                problems.append(f"{worker} does not see {report['missing'][:3]}")
        if problems:
            raise RuntimeError(
                "Dask workers differ from the driver: "
                + "; ".join(problems)
                + ". Every worker needs the same installed project and the project's data/ "
                "mounted at the driver's path (docs/CLUSTER.md)"
            )

    # ------------------------------------------------------------------ nodes

    def _submit(self, node: Node) -> tuple[Any, dict[str, Any]]:
        """Submit ``node`` as a task: what the worker opens, receives and returns. Also returns
        the inputs the driver holds (what its hooks saw)."""
        shipped: dict[str, AbstractDataset] = {}
        received: dict[str, Any] = {}
        copy_modes: dict[str, str | None] = {}
        driver_inputs: dict[str, Any] = {}
        for name in node.inputs:
            place = self.places[name]
            if place == "worker":
                shipped[name] = self.datasets[name]
            elif place == "memory":
                received[name] = self._memory_input(name, node)
                copy_modes[name] = getattr(self.datasets[name], "_copy_mode", None)
                if name in self.local:
                    driver_inputs[name] = self.local[name]
            else:
                value = self.hooks.load(self.catalog, name, node)
                driver_inputs[name] = value
                received[name] = self._ship(value)
                copy_modes[name] = "assign"
        replaced = self.hooks.before_node_run(node, self.catalog, driver_inputs, self)
        for name, value in replaced.items():
            driver_inputs[name] = value
            received[name] = self._ship(value)
            copy_modes[name] = "assign"
            shipped.pop(name, None)
        for name in node.outputs:
            if self.places[name] == "worker":
                shipped[name] = self.datasets[name]
        returned = [name for name in node.outputs if self.places[name] != "worker"]
        future = self.client.submit(
            run_node_on_worker,
            node,
            shipped,
            received,
            copy_modes,
            returned,
            self.worker_hooks,
            self.run_id,
            self.is_async,
            self.threads,
            key=f"node-{node.name}-{self.token}",
            pure=False,
        )
        return future, driver_inputs

    def _memory_input(self, name: str, node: Node) -> Any:
        """The future (or small value) of a memory dataset's data; pipeline inputs are loaded
        here once and shipped."""
        if name not in self.remote:
            if name not in self.pipeline.inputs():
                raise RuntimeError(f"in-memory dataset {name!r} was not made before {node.name}")
            value = self.hooks.load(self.catalog, name, node)
            self.local[name] = value
            self.remote[name] = self._ship(value)
        return self.remote[name]

    def _ship(self, value: Any) -> Any:
        from dask.sizeof import sizeof

        if sizeof(value) < SCATTER_BYTES:
            return value
        return self.client.scatter(value, hash=False)

    def _finish(self, node: Node, future: Any, inputs: dict[str, Any]) -> None:
        """Driver side of a finished node: save what the driver keeps, hooks, releases."""
        returned = [name for name in node.outputs if self.places[name] != "worker"]
        kept = [
            name
            for name in returned
            if self.places[name] == "driver" or name in self.pipeline.outputs()
        ]
        values = {}
        if kept:
            values = self.client.submit(
                _select, future, kept, key=f"kept-{node.name}-{self.token}", pure=False
            ).result()
        for name in returned:
            if self.places[name] == "memory" and self.load_counts[name] > 0:
                self.remote[name] = self.client.submit(
                    operator.getitem, future, name, key=f"data-{name}-{self.token}", pure=False
                )
        for name in kept:
            self.hooks.save(self.catalog, name, values[name], node)
        for name in node.outputs:
            if self.places[name] == "worker":
                # The worker saved a new version; the driver's copy must not load an old one.
                clear = getattr(self.datasets[name], "_clear_version_cache", None)
                if clear is not None:
                    clear()
        self.hooks.after_node_run(node, self.catalog, inputs, values, self)
        for name in node.inputs:
            self.load_counts[name] -= 1
            if self.load_counts[name] < 1:
                self.remote.pop(name, None)
                self.local.pop(name, None)
                if name not in self.pipeline.inputs():
                    self.catalog.release(name)
        for name in node.outputs:
            if self.load_counts[name] < 1 and name not in self.pipeline.outputs():
                self.catalog.release(name)


class _DriverHooks:
    """The session's hooks but the worker ones, called in the driver with what it holds."""

    def __init__(self, hook_manager: PluginManager | None, worker_hooks: tuple[Any, ...]):
        self.manager = hook_manager if isinstance(hook_manager, PluginManager) else None
        if self.manager is None:
            self.removed: list[Any] = []
            return
        worker_types = {type(hook) for hook in worker_hooks}
        self.removed = [
            plugin
            for plugin in self.manager.get_plugins()
            if any(plugin is hook for hook in worker_hooks) or type(plugin) in worker_types
        ]

    def _call(self, name: str, **kwargs: Any) -> list[Any]:
        if self.manager is None:
            return []
        return self.manager.subset_hook_caller(name, remove_plugins=self.removed)(**kwargs) or []

    def load(self, catalog: CatalogProtocol, name: str, node: Node) -> Any:
        self._call("before_dataset_loaded", dataset_name=name, node=node)
        value = catalog.load(name)
        self._call("after_dataset_loaded", dataset_name=name, data=value, node=node)
        return value

    def save(self, catalog: CatalogProtocol, name: str, value: Any, node: Node) -> None:
        self._call("before_dataset_saved", dataset_name=name, data=value, node=node)
        catalog.save(name, value)
        self._call("after_dataset_saved", dataset_name=name, data=value, node=node)

    def before_node_run(
        self, node: Node, catalog: CatalogProtocol, inputs: dict[str, Any], run: _PipelineRun
    ) -> dict[str, Any]:
        replaced: dict[str, Any] = {}
        for response in self._call(
            "before_node_run",
            node=node,
            catalog=catalog,
            inputs=dict(inputs),
            is_async=run.is_async,
            run_id=run.run_id,
        ):
            if response is not None and not isinstance(response, dict):
                raise TypeError(
                    f"'before_node_run' must return either None or a dictionary mapping "
                    f"dataset names to updated values, got '{type(response).__name__}' instead."
                )
            replaced.update(response or {})
        return replaced

    def after_node_run(
        self,
        node: Node,
        catalog: CatalogProtocol,
        inputs: dict[str, Any],
        outputs: dict[str, Any],
        run: _PipelineRun,
    ) -> None:
        self._call(
            "after_node_run",
            node=node,
            catalog=catalog,
            inputs=inputs,
            outputs=outputs,
            is_async=run.is_async,
            run_id=run.run_id,
        )

    def on_node_error(
        self,
        error: BaseException,
        node: Node,
        catalog: CatalogProtocol,
        inputs: dict[str, Any],
        run: _PipelineRun,
    ) -> None:
        self._call(
            "on_node_error",
            error=error,
            node=node,
            catalog=catalog,
            inputs=inputs,
            is_async=run.is_async,
            run_id=run.run_id,
        )


class _Received(MemoryDataset):
    """A memory dataset on the worker holding data that arrived with the task (no copy on
    arrival; each load copies with the original dataset's copy mode)."""

    def __init__(self, data: Any, copy_mode: str | None) -> None:
        super().__init__(copy_mode=copy_mode)
        self._data = data


def run_node_on_worker(
    node: Node,
    shipped: dict[str, AbstractDataset],
    received: dict[str, Any],
    copy_modes: dict[str, str | None],
    returned: list[str],
    hooks: tuple[Any, ...],
    run_id: str | None,
    is_async: bool,
    threads: int,
) -> dict[str, Any]:
    """Run ``node`` on a Dask worker as Kedro's ``Task`` does; the values of ``returned``.

    ``shipped`` are the file datasets the worker loads and saves itself; ``received`` the data
    of the other inputs; ``returned`` names the outputs the driver or other workers take (memory
    and driver datasets). ``hooks`` run here around the node; torch uses ``threads`` threads.
    """
    from weighted_lowrank.lowrank.fanout import call_with_threads

    catalog = DataCatalog(
        datasets={
            **shipped,
            **{name: _Received(value, copy_modes[name]) for name, value in received.items()},
            **{name: MemoryDataset(copy_mode="assign") for name in returned},
        }
    )
    hook_manager = _create_hook_manager()
    for hook in hooks:
        hook_manager.register(hook)
    task = Task(
        node=node, catalog=catalog, is_async=is_async, hook_manager=hook_manager, run_id=run_id
    )
    call_with_threads(task.execute, threads)
    return {name: catalog.load(name) for name in returned}


def _select(values: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {name: values[name] for name in names}


def _local_path(dataset: AbstractDataset) -> Path | None:
    """The local file or directory a dataset reads, when it has one."""
    filepath = getattr(dataset, "_filepath", None)
    protocol = getattr(dataset, "_protocol", "file")
    if filepath is None or protocol not in ("file", None):
        return None
    return Path(str(filepath))


def _package_versions() -> dict[str, str | None]:
    versions = {}
    for package in CHECKED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _worker_environment(paths: list[str]) -> dict[str, Any]:
    """Run on every worker: its package versions and which of ``paths`` it cannot see."""
    return {
        "versions": _package_versions(),
        "missing": [path for path in paths if not os.path.exists(path)],
    }
