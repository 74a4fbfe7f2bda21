"""Seed sweeps: repeatable runs, mean ± sd over seeds and differences paired by seed."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.test_session import _copy_project
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.reporting.run_history import (
    child_runs,
    latest_per_seed,
    paired_p_values,
    seed_differences,
    seed_summary,
)
from weighted_lowrank.sweep import _deep_merge, parse_overrides, run_sweep, sweep_report

#: Metrics that measure time, which no repeat can reproduce.
TIMINGS = {"latency_ms", "latency_dense_ms", "latency_ratio", "factorization_seconds"}


def _runs(rows: list[tuple[str, float, int, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "solver": solver,
                "budget": budget,
                "seed": str(seed),
                "accuracy": accuracy,
                "started": pd.Timestamp(2026, 1, 1) + pd.Timedelta(minutes=index),
            }
            for index, (solver, budget, seed, accuracy) in enumerate(rows)
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


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Seeds 1 and 2 at budgets 0.1 and 0.2 in the smoke environment, then seed 1 at 0.1 again."""
    project = tmp_path_factory.mktemp("sweep")
    model_dir = _copy_project(project)
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
