"""Dask: the layer fan-out (``compression.parallel: tcp://…``) and ``DaskRunner`` give the
sequential results, logging in the driver.

One LocalCluster of two single-thread worker processes serves the module; the tiny BERT's
targeted layers fall into three shape groups, so each fan-out is three tasks.
"""

from __future__ import annotations

import logging
import os

import dask
import pandas as pd
import pytest
import torch
from distributed import Client, LocalCluster, get_task_stream
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import AbstractDataset, DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro.runner import SequentialRunner

from tests.conftest import make_tiny_bundle, typed_params
from tests.pipelines.conftest import (
    BUDGET,
    fast_options,
    make_calibration_statistics,
    make_fisher_information,
)
from weighted_lowrank.kedro_glue.hooks import LineageCheck
from weighted_lowrank.kedro_glue.runner import DaskRunner, dataset_place
from weighted_lowrank.lowrank.compression import factorize_model, model_loss_curves
from weighted_lowrank.lowrank.dask_map import close_clients
from weighted_lowrank.lowrank.parallel import parse_parallel
from weighted_lowrank.pipelines.factorization import create_pipeline

SOLVERS = ("als", "kfwsvd")


@pytest.fixture(scope="module")
def cluster():
    # The scheduler lives in this process: keep its INFO lines out of the test output.
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    client = Client(cluster, set_as_default=False)
    try:
        yield cluster, client
    finally:
        close_clients()
        client.close()
        cluster.close()
        quiet.setLevel(level)


@pytest.fixture(scope="module")
def problem():
    bundle = make_tiny_bundle(seed=1)
    fisher_information = make_fisher_information(bundle.model)
    return bundle, fisher_information, make_calibration_statistics(bundle.model)


def _same_results(sequential, fanned) -> None:
    """Factors, losses, iterations, stop reasons, infos and loss histories equal (bit for bit);
    only the wall-clock fields (seconds, the history's times) may differ."""
    assert list(sequential) == list(fanned)
    for name, expected in sequential.items():
        got = fanned[name]
        assert torch.equal(expected.left, got.left), name
        assert torch.equal(expected.right, got.right), name
        assert (expected.loss, expected.initial_loss) == (got.loss, got.initial_loss), name
        assert (expected.rank, expected.solver) == (got.rank, got.solver)
        assert (expected.iterations, expected.stop_reason) == (got.iterations, got.stop_reason)
        assert expected.info == got.info
        assert [loss for _, loss in expected.history] == [loss for _, loss in got.history]


@pytest.mark.parametrize(
    ("solver", "options"), [("als", {"max_iters": 15}), ("adam", {"max_iters": 40}), ("kfwsvd", {})]
)
def test_fanned_out_factorization_equals_the_sequential_one(cluster, problem, solver, options):
    local_cluster, client = cluster
    bundle, fisher_information, statistics = problem
    arguments = dict(statistics=statistics["tensors"], seed=3, **options)
    sequential = factorize_model(
        bundle.model, fisher_information["tensors"], BUDGET, solver, **arguments
    )
    with get_task_stream(client) as stream:
        fanned = factorize_model(
            bundle.model,
            fisher_information["tensors"],
            BUDGET,
            solver,
            map_groups=parse_parallel(local_cluster.scheduler_address).map_groups,
            device="cpu",
            **arguments,
        )
    _same_results(sequential, fanned)
    # One task per (shape, rank) group: q/k/v/o, the FFN's up and its down projection.
    assert len(stream.data) == 3
    assert all(result.left.device.type == "cpu" for result in fanned.values())


@pytest.mark.parametrize(("solver", "loss_model"), [("tfwsvd", "own"), ("kfwsvd", "kronecker")])
def test_fanned_out_loss_curves_equal_the_sequential_ones(cluster, problem, solver, loss_model):
    local_cluster, _ = cluster
    bundle, fisher_information, statistics = problem
    arguments = dict(statistics=statistics["tensors"], loss_model=loss_model, num_examples=4)
    sequential = model_loss_curves(bundle.model, fisher_information["tensors"], solver, **arguments)
    fanned = model_loss_curves(
        bundle.model,
        fisher_information["tensors"],
        solver,
        map_groups=parse_parallel(local_cluster.scheduler_address).map_groups,
        **arguments,
    )
    assert list(sequential) == list(fanned)
    for name, curve in sequential.items():
        assert (curve.out_features, curve.in_features) == (
            fanned[name].out_features,
            fanned[name].in_features,
        )
        assert (curve.losses == fanned[name].losses).all(), name


def torch_threads(_) -> int:
    return torch.get_num_threads()


def test_every_task_runs_with_the_callers_torch_thread_count(cluster):
    # Workers start with one thread (Dask sets OMP_NUM_THREADS=1); CPU reductions round
    # differently with another count, so each task takes the caller's.
    local_cluster, _ = cluster
    map_groups = parse_parallel(local_cluster.scheduler_address).map_groups
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        counts = list(map_groups(torch_threads, [0, 1]))
    finally:
        torch.set_num_threads(previous)
    assert counts == [2, 2]


def test_a_scheduler_that_does_not_answer_is_named_in_the_error(problem):
    bundle, fisher_information, _ = problem
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(ValueError, match="no Dask scheduler answers at 'tcp://127.0.0.1:9'"),
    ):
        factorize_model(
            bundle.model,
            fisher_information["tensors"],
            BUDGET,
            "svd",
            map_groups=parse_parallel("tcp://127.0.0.1:9").map_groups,
        )


# ----------------------------------------------------------------------------- DaskRunner


class RecordingMlflowDataset(AbstractDataset):
    """Stands for an MLflow-logging dataset (its name says mlflow): records the saving process."""

    def __init__(self) -> None:
        self.data = None
        self.saved_by: list[int] = []

    def _save(self, data) -> None:
        self.saved_by.append(os.getpid())
        self.data = data

    def _load(self):
        return self.data

    def _describe(self) -> dict:
        return {}


class DriverRecorder:
    """A plugin hook of the session (as kedro-mlflow's): where it runs and what it is shown."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, tuple[str, ...]]] = []

    @hook_impl
    def before_node_run(self, node, catalog, inputs):
        self.calls.append((node.name, os.getpid(), tuple(sorted(inputs))))


class WorkerPidFile:
    """A project hook (as LineageCheck): appends "node pid inputs" per node run to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    @hook_impl
    def before_node_run(self, node, inputs):
        with open(self.path, "a") as lines:
            lines.write(f"{node.name} {os.getpid()} {len(inputs)}\n")


def _catalog(root, bundle, fisher_information, statistics, parallel) -> DataCatalog:
    """The factorization catalog in ``root``: the project's file datasets (versioned model
    directories and rank maps), an in-memory SVD reference, and one MLflow-like dataset."""
    parquet = "pandas.ParquetDataset"
    catalog = DataCatalog.from_config(
        {
            "{solver}.compressed_model": {
                "type": "weighted_lowrank.kedro_glue.datasets.HFModelDataset",
                "filepath": str(root / "compressed" / "{solver}"),
                "compressed": True,
                "versioned": True,
            },
            "{solver}.rank_map": {
                "type": parquet,
                "filepath": str(root / "{solver}" / "rank_map.parquet"),
                "versioned": True,
            },
            "{solver}.loss_curves": {
                "type": parquet,
                "filepath": str(root / "{solver}" / "loss_curves.parquet"),
            },
            "{solver}.convergence": {
                "type": parquet,
                "filepath": str(root / "{solver}" / "convergence.parquet"),
            },
        }
    )
    catalog["fine_tuned_model"] = MemoryDataset(bundle, copy_mode="assign")
    catalog["fisher_information"] = MemoryDataset(fisher_information)
    catalog["calibration_statistics"] = MemoryDataset(statistics)
    catalog["params:compression"] = typed_params(
        "compression",
        budget=BUDGET,
        curve_loss_model="kronecker",
        seed=0,
        device="cpu",
        parallel=parallel,
    )
    for solver in SOLVERS:
        catalog[f"params:{solver}.options"] = fast_options(solver)
        catalog[f"{solver}.layer_report"] = RecordingMlflowDataset()
    return catalog


def _outputs(catalog: DataCatalog, solver: str) -> dict:
    """A namespace's outputs without their wall-clock columns."""
    timeless = {
        "loss_curves": ["seconds"],
        "rank_map": [],
        "layer_report": ["seconds", "total_seconds"],
        "convergence": ["seconds"],
    }
    tables = {
        name: catalog.load(f"{solver}.{name}").drop(columns=columns).reset_index(drop=True)
        for name, columns in timeless.items()
    }
    return {**tables, "weights": catalog.load(f"{solver}.compressed_model").model.state_dict()}


def test_dask_runner_gives_the_sequential_outputs_and_keeps_logging_in_the_driver(
    cluster, problem, tmp_path
):
    local_cluster, _ = cluster
    bundle, fisher_information, statistics = problem
    pipeline = create_pipeline().only_nodes_with_namespaces(
        list(SOLVERS)
    ) + create_pipeline().only_nodes("svd_reference")
    sequential = _catalog(tmp_path / "sequential", bundle, fisher_information, statistics, "serial")
    SequentialRunner().run(pipeline, sequential)

    # The Dask run also fans each node's layer groups out to the same cluster, from the worker
    # that runs the node.
    distributed_catalog = _catalog(
        tmp_path / "dask", bundle, fisher_information, statistics, local_cluster.scheduler_address
    )
    assert dataset_place(distributed_catalog.get("als.layer_report")) == "driver"
    assert dataset_place(distributed_catalog.get("als.rank_map")) == "worker"
    assert dataset_place(distributed_catalog.get("fine_tuned_model")) == "memory"
    pid_file = tmp_path / "worker_hooks.txt"
    worker_hook, recorder = WorkerPidFile(str(pid_file)), DriverRecorder()
    hook_manager = _create_hook_manager()
    hook_manager.register(recorder)
    hook_manager.register(worker_hook)  # as a session registers settings.HOOKS
    runner = DaskRunner(
        address=local_cluster.scheduler_address, worker_hooks=[worker_hook, LineageCheck()]
    )
    outputs = runner.run(pipeline, distributed_catalog, hook_manager=hook_manager)

    assert set(outputs) == {
        f"{solver}.{name}"
        for solver in SOLVERS
        for name in ("compressed_model", "layer_report", "convergence")
    }
    for solver in SOLVERS:
        expected, got = _outputs(sequential, solver), _outputs(distributed_catalog, solver)
        for name in ("loss_curves", "rank_map", "layer_report", "convergence"):
            pd.testing.assert_frame_equal(got[name], expected[name], check_exact=True)
        assert expected["weights"].keys() == got["weights"].keys()
        assert all(
            torch.equal(expected["weights"][k], got["weights"][k]) for k in expected["weights"]
        )
        # The MLflow-like dataset was saved by the driver (this process), not by a worker.
        assert distributed_catalog.get(f"{solver}.layer_report").saved_by == [os.getpid()]
    # The session's plugin hooks ran here, once per node, shown the inputs the driver holds.
    assert sorted(name for name, _, _ in recorder.calls) == sorted(
        node.name for node in pipeline.nodes
    )
    assert {pid for _, pid, _ in recorder.calls} == {os.getpid()}
    compress_inputs = {inputs for name, _, inputs in recorder.calls if name == "als.compress"}
    assert compress_inputs == {
        (
            "calibration_statistics",
            "fine_tuned_model",
            "fisher_information",
            "params:als.options",
            "params:compression",
        )
    }
    # The project's hooks ran on the workers only, once per node, with every input.
    runs = [line.split() for line in pid_file.read_text().splitlines()]
    assert sorted(name for name, _, _ in runs) == sorted(node.name for node in pipeline.nodes)
    assert os.getpid() not in {int(pid) for _, pid, _ in runs}
    assert {name: int(count) for name, _, count in runs}["als.compress"] == 7


def make_list(size: int) -> list[int]:
    return list(range(size))


def append_and_count(values: list[int]) -> int:
    values.append(100)  # mutates its input: the other consumer must not see it
    return len(values)


def total(values: list[int]) -> int:
    return sum(values)


def test_dask_runner_passes_in_memory_outputs_between_workers_with_their_copy_mode(cluster):
    local_cluster, _ = cluster
    pipeline = Pipeline(
        [
            # An output named like its node: the runner's task keys must not collide.
            Node(make_list, "params:size", "listed", name="listed"),
            Node(append_and_count, "listed", "count", name="count"),
            Node(total, "listed", "total", name="sum"),
        ]
    )
    results = {}
    for runner in (
        SequentialRunner(),
        DaskRunner(address=local_cluster.scheduler_address, worker_hooks=[]),
    ):
        catalog = DataCatalog({"params:size": MemoryDataset(5)})
        outputs = runner.run(pipeline, catalog)
        results[type(runner).__name__] = {name: data.load() for name, data in outputs.items()}
    assert results["DaskRunner"] == results["SequentialRunner"] == {"count": 6, "total": 10}


def test_dask_runner_reports_a_failing_node_with_its_own_error(cluster, problem, tmp_path):
    local_cluster, _ = cluster
    bundle, fisher_information, statistics = problem
    catalog = _catalog(tmp_path, bundle, fisher_information, statistics, "serial")
    catalog["params:als.options"] = {"max_iters": -1}
    pipeline = create_pipeline().only_nodes("svd_reference", "als.loss_curves")
    runner = DaskRunner(address=local_cluster.scheduler_address, worker_hooks=[])
    with pytest.raises(ValueError, match="max_iters"):
        runner.run(pipeline, catalog)
