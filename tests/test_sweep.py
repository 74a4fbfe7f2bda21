"""Seed sweeps: repeatable runs, mean ± sd over seeds and differences paired by seed."""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

import weighted_lowrank.analysis.sweep as sweep_module
from tests.test_session import copy_project
from weighted_lowrank.analysis.run_history import (
    allocation_differences,
    allocation_p_values,
    child_runs,
    latest_per_seed,
    paired_p_values,
    seed_differences,
    seed_summary,
)
from weighted_lowrank.analysis.sweep import (
    RESTART_NODES,
    _deep_merge,
    parse_overrides,
    run_sweep,
    sweep_report,
)
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.refined.pipeline import default_pipeline

#: Metrics that measure time, which no repeat can reproduce.
TIMINGS = {"latency_ms", "latency_dense_ms", "latency_ratio", "factorization_seconds"}


def _runs(rows: list[tuple], allocation: str = "uniform") -> pd.DataFrame:
    """Child runs from (solver, budget, seed, accuracy[, allocation]) tuples."""
    return pd.DataFrame(
        [
            {
                "solver": row[0],
                "budget": row[1],
                "seed": str(row[2]),
                "accuracy": row[3],
                "allocation": row[4]
                if len(row) > 4
                else "dense"
                if row[0] == "dense"
                else allocation,
                "started": pd.Timestamp(2026, 1, 1) + pd.Timedelta(minutes=index),
            }
            for index, row in enumerate(rows)
        ]
    )


def test_seed_summary_and_paired_differences_on_known_numbers():
    runs = latest_per_seed(
        _runs(
            [
                ("fwsvd", 0.5, 0, 0.70),
                ("fwsvd", 0.5, 1, 0.80),
                ("fwsvd", 0.5, 2, 0.75),
                ("svd", 0.5, 0, 0.60),
                ("svd", 0.5, 1, 0.85),
                ("svd", 0.5, 2, 0.70),
                ("svd", 0.5, 2, 0.65),  # a re-run of seed 2 replaces the first
                ("dense", 1.0, 0, 0.90),
            ]
        )
    )
    summary = seed_summary(runs).set_index(["solver", "budget"])
    assert summary.loc[("svd", 0.5), "n"] == 3
    assert summary.loc[("svd", 0.5), "mean"] == pytest.approx((0.60 + 0.85 + 0.65) / 3)
    assert summary.loc[("svd", 0.5), "sd"] == pytest.approx(pd.Series([0.60, 0.85, 0.65]).std())
    assert summary.index[0] == ("dense", 1.0)
    (row,) = seed_differences(runs).itertuples()
    assert row.solver == "svd" and row.n == 3 and row.ahead == 1
    assert row.differences == pytest.approx({0: -0.10, 1: 0.05, 2: -0.10})
    assert row.mean_diff == pytest.approx(-0.05)
    assert row.allocation == "uniform"


def test_each_allocation_is_summarised_and_paired_with_the_reference_on_its_own():
    runs = latest_per_seed(
        _runs(
            [
                ("fwsvd", 0.5, 0, 0.70),
                ("fwsvd", 0.5, 1, 0.80),
                ("svd", 0.5, 0, 0.60),
                ("svd", 0.5, 1, 0.85),
                ("fwsvd", 0.5, 0, 0.72, "global"),
                ("fwsvd", 0.5, 1, 0.82, "global"),
                ("svd", 0.5, 0, 0.75, "global"),
                ("svd", 0.5, 1, 0.80, "global"),
            ]
        )
    )
    summary = seed_summary(runs).set_index(["solver", "budget", "allocation"])
    assert summary.loc[("svd", 0.5, "global"), "mean"] == pytest.approx(0.775)
    assert summary.loc[("svd", 0.5, "uniform"), "mean"] == pytest.approx(0.725)
    rows = seed_differences(runs).set_index("allocation")
    assert rows.loc["uniform", "differences"] == pytest.approx({0: -0.10, 1: 0.05})
    assert rows.loc["global", "differences"] == pytest.approx({0: 0.03, 1: -0.02})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Seeds 1 and 2 at budgets 0.1 and 0.2 in the smoke environment, then seed 1 at 0.1 again."""
    project = tmp_path_factory.mktemp("sweep")
    model_dir = copy_project(project)
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    params = {"mlflow_tracking_uri": tracking_uri, "model": {"source": str(model_dir)}}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        run_sweep([1, 2], [0.1, 0.2], project_path=project, env="smoke", runtime_params=params)
        run_sweep([1], [0.1], project_path=project, env="smoke", runtime_params=params)
    mlflow.set_tracking_uri(previous)
    return project, tracking_uri


def test_every_seed_and_budget_is_its_own_parent_run(sweep):
    project, tracking_uri = sweep
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("weighted_lowrank")
    parents = [
        run
        for run in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" not in run.data.tags
    ]
    assert sorted(
        (run.data.params["seed"], run.data.params["compression.budget"]) for run in parents
    ) == [("1", "0.1"), ("1", "0.1"), ("1", "0.2"), ("2", "0.1"), ("2", "0.2")]
    # The split stays the configured one: every seed is scored on the same sentences.
    assert {run.data.params["data.split.seed"] for run in parents} == {"42"}


def test_a_repeated_seed_reproduces_every_metric_but_the_timings(sweep):
    _, tracking_uri = sweep
    runs = child_runs(tracking_uri)
    repeated = runs[(runs["seed"] == "1") & (runs["budget"].isin([0.1, 1.0]))]
    first, second = (group for _, group in repeated.groupby("parent_run"))
    metrics = [c for c in runs.select_dtypes("number").columns if c not in TIMINGS | {"budget"}]
    pd.testing.assert_frame_equal(
        first.set_index("solver").sort_index()[metrics],
        second.set_index("solver").sort_index()[metrics],
    )


def test_another_seed_fine_tunes_another_model(sweep):
    project, tracking_uri = sweep
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("weighted_lowrank")
    fingerprints = {}
    for run in client.search_runs([experiment.experiment_id], "tags.kind = 'dense'"):
        fingerprints.setdefault(run.data.params["seed"], set()).add(
            run.data.tags["model_fingerprint"]
        )
    assert len(fingerprints["1"]) == 1 and len(fingerprints["2"]) == 1
    assert fingerprints["1"] != fingerprints["2"]
    versions = list((project / "data" / "06_models" / "fine_tuned_model").iterdir())
    assert len(versions) == 3  # seed 1, seed 2, seed 1 again: the other budgets reuse them


def test_the_report_pairs_every_solver_with_fwsvd_by_seed(sweep):
    _, tracking_uri = sweep
    report = sweep_report(tracking_uri)
    assert "## Test accuracy over seeds (mean ± sd)" in report
    assert "(n=2)" in report and "budget 0.1" in report and "budget 0.2" in report
    differences = seed_differences(latest_per_seed(child_runs(tracking_uri)))
    assert set(differences["solver"]) == set(SOLVERS) - {"fwsvd"}
    assert set(differences["n"]) == {2}
    assert all(f"| {solver} |" in report for solver in SOLVERS if solver != "fwsvd")
    p_values = paired_p_values(tracking_uri)
    assert set(p_values["seed"]) == {1, 2} and set(p_values["budget"]) == {0.1, 0.2}
    assert p_values["p"].between(0, 1).all()
    assert "mcnemar_p" in report


def test_overrides_keep_commas_and_merge_block_by_block():
    overrides = parse_overrides(
        ["data.catalog.label_values=[rotten,fresh,plot]", "fine_tuning.epochs=3"]
    )
    assert overrides == {
        "data": {"catalog": {"label_values": ["rotten", "fresh", "plot"]}},
        "fine_tuning": {"epochs": 3},
    }
    merged = _deep_merge(overrides, {"seed": 1, "data": {"split": {"seed": 42}}})
    assert merged["data"] == {
        "catalog": {"label_values": ["rotten", "fresh", "plot"]},
        "split": {"seed": 42},
    }
    assert merged["seed"] == 1 and merged["fine_tuning"] == {"epochs": 3}
    with pytest.raises(ValueError, match="not 'dotted.key=value'"):
        parse_overrides(["data.source"])


# ----------------------------------------------------------------------------- allocations

LABELS = np.array([0, 1] * 5)


def _predictions(right: np.ndarray) -> pd.DataFrame:
    """Predictions on the 10 shared test examples, right where ``right`` is."""
    return pd.DataFrame(
        {
            "id": np.arange(len(LABELS)),
            "label": LABELS,
            "prediction": np.where(right, LABELS, 1 - LABELS).astype(np.int64),
            "loss": np.where(right, 0.1, 2.0),
        }
    )


def _first(count: int) -> np.ndarray:
    return np.arange(len(LABELS)) < count


@pytest.fixture(scope="module")
def allocation_store(tmp_path_factory):
    """Seeds 0 and 1 at budget 0.5 with both allocations. Seed 0's uniform run predates the
    allocation param (neither its parent nor its children have one). svd's child runs hold their
    predictions; fwsvd's none (as runs before predictions were logged)."""
    folder = tmp_path_factory.mktemp("allocations")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.create_experiment("weighted_lowrank")
    # (seed, allocation or None) → svd's examples right, svd's test_loss, fwsvd's accuracy.
    runs = {
        (0, None): (_first(5), 0.70, 0.60),
        (0, "global"): (_first(8), 0.55, 0.65),
        (1, "uniform"): (_first(6), 0.65, 0.62),
        (1, "global"): (np.arange(10) >= 2, 0.60, 0.61),
    }
    for (seed, allocation), (right, loss, fwsvd) in runs.items():
        params = {"seed": seed, "compression.budget": 0.5}
        if allocation:
            params["compression.allocation"] = allocation
        parent = client.create_run(experiment, run_name="__default__")
        for key, value in params.items():
            client.log_param(parent.info.run_id, key, value)
        client.log_metric(parent.info.run_id, "paired.svd.vs_fwsvd.p", 0.1 + seed / 10)
        children = {"svd": (float(right.mean()), loss), "fwsvd": (fwsvd, 0.5)}
        if allocation != "global":
            children["dense"] = (0.9, 0.3)
        for solver, (accuracy, test_loss) in children.items():
            child = client.create_run(
                experiment, run_name=solver, tags={"mlflow.parentRunId": parent.info.run_id}
            )
            run_id = child.info.run_id
            dense = solver == "dense"
            child_params = {"solver": solver, "budget": 1.0 if dense else 0.5, "seed": seed}
            if allocation:
                child_params["allocation"] = "dense" if dense else allocation
            for key, value in child_params.items():
                client.log_param(run_id, key, value)
            client.log_metric(run_id, "accuracy", accuracy)
            client.log_metric(run_id, "test_loss", test_loss)
            if solver == "svd":
                path = folder / run_id / "predictions.parquet"
                path.parent.mkdir()
                _predictions(right).to_parquet(path)
                client.log_artifact(run_id, str(path))
            client.set_terminated(run_id)
        client.set_terminated(parent.info.run_id)
    return f"sqlite:///{folder / 'mlflow.db'}"


def test_runs_without_an_allocation_param_count_as_uniform(allocation_store):
    runs = latest_per_seed(child_runs(allocation_store))
    keys = set(zip(runs["solver"], runs["allocation"], runs["seed"], strict=True))
    assert keys == {
        ("dense", "dense", 0),
        ("dense", "dense", 1),
        *(
            (solver, allocation, seed)
            for solver in ("svd", "fwsvd")
            for seed in (0, 1)
            for allocation in ("uniform", "global")
        ),
    }
    p_values = paired_p_values(allocation_store).set_index(["allocation", "seed"])["p"]
    assert p_values.to_dict() == pytest.approx(
        {("uniform", 0): 0.1, ("global", 0): 0.1, ("uniform", 1): 0.2, ("global", 1): 0.2}
    )


def test_global_is_paired_with_uniform_by_seed(allocation_store):
    runs = latest_per_seed(child_runs(allocation_store))
    differences = allocation_differences(runs).set_index("solver")
    assert sorted(differences.index) == ["fwsvd", "svd"]  # dense has no allocation to compare
    svd = differences.loc["svd"]
    assert svd["budget"] == 0.5 and svd["n"] == 2 and svd["ahead"] == 2
    assert svd["differences"] == pytest.approx({0: 0.8 - 0.5, 1: 0.8 - 0.6})
    assert svd["mean_diff"] == pytest.approx(0.25)
    assert svd["loss_differences"] == pytest.approx({0: 0.55 - 0.70, 1: 0.60 - 0.65})
    assert svd["loss_mean_diff"] == pytest.approx(-0.10)
    assert differences.loc["fwsvd", "differences"] == pytest.approx({0: 0.05, 1: -0.01})
    assert differences.loc["fwsvd", "ahead"] == 1

    # McNemar from the two child runs' predictions: seed 0, global right on 3 more examples and
    # on none fewer; seed 1, global right on 6..9 only, uniform on 0..1 only. fwsvd logged none.
    p_values = allocation_p_values(allocation_store, runs).set_index(["solver", "seed"])
    assert list(p_values.index) == [("svd", 0), ("svd", 1)]
    assert p_values.loc[("svd", 0), ["wins", "losses"]].tolist() == [3, 0]
    assert p_values.loc[("svd", 1), ["wins", "losses"]].tolist() == [4, 2]
    assert p_values.loc[("svd", 0), "p"] == pytest.approx(stats.binomtest(3, 3).pvalue)
    assert p_values.loc[("svd", 1), "p"] == pytest.approx(stats.binomtest(4, 6).pvalue)

    report = sweep_report(allocation_store)
    summary, _, allocations = report.partition("## global − uniform, paired by seed")
    assert "| svd | uniform |" in summary and "| svd | global |" in summary
    assert "| dense | dense |" in summary
    assert "| svd | 0.5 | 2 |" in allocations and "0: +0.3000, 1: +0.2000" in allocations
    assert "0: 0.25, 1: 0.688" in allocations


def test_only_seeds_that_ran_both_allocations_are_paired(allocation_store):
    runs = latest_per_seed(child_runs(allocation_store))
    assert allocation_differences(runs[runs["allocation"] != "global"]).empty
    one_seed = runs[(runs["allocation"] != "global") | (runs["seed"] == 1)]
    svd = allocation_differences(one_seed).set_index("solver").loc["svd"]
    assert svd["n"] == 1 and svd["differences"] == pytest.approx({1: 0.2})


def test_the_sweep_runs_every_allocation_of_a_budget_and_the_whole_pipeline_once_per_seed(
    monkeypatch, tmp_path
):
    sessions = []

    class Session:
        def __init__(self, runtime_params):
            self.runtime_params = runtime_params

        @classmethod
        def create(cls, project_path, env, runtime_params):
            return cls(runtime_params)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def load_context(self):
            # Kedro hands the context's parameters over as the typed blocks.
            data = SimpleNamespace(split=SimpleNamespace(seed=42))
            return SimpleNamespace(params={"data": data})

        def run(self, pipeline_names, from_nodes):
            sessions.append((self.runtime_params, from_nodes))

    monkeypatch.setattr("kedro.framework.session.KedroSession", Session)
    monkeypatch.setattr("kedro.framework.startup.bootstrap_project", lambda path: None)
    run_sweep(
        [3, 4],
        [0.5, 0.3],
        allocations=["uniform", "global"],
        project_path=tmp_path,
        runtime_params={"compression": {"targets": "query"}, "mlflow_tracking_uri": "x"},
    )
    runs = [
        (
            params["seed"],
            params["compression"]["budget"],
            params["compression"]["allocation"],
            from_nodes,
        )
        for params, from_nodes in sessions
    ]
    later = list(RESTART_NODES)
    assert runs == [
        (3, 0.5, "uniform", None),
        (3, 0.5, "global", later),
        (3, 0.3, "uniform", later),
        (3, 0.3, "global", later),
        (4, 0.5, "uniform", None),
        (4, 0.5, "global", later),
        (4, 0.3, "uniform", later),
        (4, 0.3, "global", later),
    ]
    # --params blocks merge key by key with the sweep's own.
    assert {params["compression"]["targets"] for params, _ in sessions} == {"query"}
    assert {params["data"]["split"]["seed"] for params, _ in sessions} == {42}


def test_later_pairs_restart_at_every_node_that_reads_the_budget_or_the_allocation():
    default = default_pipeline()
    restarted = {node.name for node in default.from_nodes(*RESTART_NODES).nodes}
    readers = {node.name for node in default.nodes if "params:compression" in node.inputs}
    # The dense row reads only the targets; the loss curves only the targets, device and seed.
    curves = {f"{solver}.loss_curves" for solver in SOLVERS}
    assert readers - restarted == {"dense.evaluate", "dense.record_child_run", *curves}
    # The allocations are made again, the budget-independent curves reused.
    assert all(f"{solver}.allocate" in restarted for solver in SOLVERS)


def test_the_command_line_takes_allocations_and_defaults_to_uniform(monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *args, **kwargs: calls.append(kwargs))
    sweep_module.main(["run", "--seeds", "0"])
    sweep_module.main(["run", "--seeds", "0", "--allocations", "uniform", "global"])
    assert [call["allocations"] for call in calls] == [["uniform"], ["uniform", "global"]]
    with pytest.raises(SystemExit):
        sweep_module.main(["run", "--seeds", "0", "--allocations", "greedy"])
