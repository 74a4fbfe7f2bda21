"""reporting pipeline: child-run records, comparison table and figures from fake evaluations;
run_history on child runs of the new shape (refined rows) and of the old (``*_refined`` metrics)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.pandas import ParquetDataset
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from scipy import stats

from tests.conftest import typed_params
from weighted_lowrank.analysis.paired import (
    bootstrap_diff_interval,
    mcnemar_exact_p,
    paired_comparison,
)
from weighted_lowrank.analysis.run_history import (
    budget_table,
    child_runs,
    latest_per_budget,
    quality_vs_params_figure,
    with_refined_columns,
)
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY, fingerprint_of
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.lowrank.targets import describe_module
from weighted_lowrank.pipelines.reporting import create_pipeline
from weighted_lowrank.pipelines.reporting.nodes import (
    PAIRED_STATISTICS,
    child_run_record,
    comparison_markdown,
    comparison_table,
    dense_child_run_record,
    kl_to_dense,
    layer_group_summary,
    markdown_table,
    paired_metrics,
    paired_tests,
    rank_allocation_figure,
    refined_child_run_record,
)
from weighted_lowrank.pipelines.reporting.pipeline import (
    NAMESPACES,
    REFINED_NAMESPACES,
    SUMMARY_NODES,
    create_child_run_pipeline,
    create_refined_reporting,
)

FINGERPRINT = "0123456789abcdef"
MODULES = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)] + [
    "bert.encoder.layer.0.output.dense"
]
REFINEMENT = typed_params("refinement", trainable="factors", epochs=2)
REPORTING = typed_params("reporting", convergence_layers=2, bootstrap_resamples=500)
EXAMPLES = 60
LABELS = np.random.default_rng(0).integers(0, 3, EXAMPLES)


def fake_metrics(index: int) -> dict[str, float]:
    return {
        "accuracy": 0.7 + index / 100,
        "f1": 0.6,
        "mcc": 0.3,
        "test_loss": 0.5 + index / 50,
        "weighted_loss_rel_svd": 1.0 / (1 + index),
        "params_kept": 1000.0 - index,
        "params_model": 5000.0 - index,
        "params_ratio_layers": 0.5,
        "params_ratio_model": 0.8 + index / 1000,
        "size_on_disk_bytes": 4000.0,
        "latency_ms": 10.0 + index,
        "latency_dense_ms": 10.0 + index / 2,
        "latency_ratio": (10.0 + index) / (10.0 + index / 2),
        "factorization_seconds": 0.1 * index,
        "predicted_loss_increase": 0.01 * index,  # index 0 is dense: nothing predicted
    }


def fake_record(index: int) -> dict:
    return {FINGERPRINT_KEY: FINGERPRINT, "metrics": fake_metrics(index)}


def fake_report(index: int) -> pd.DataFrame:
    """Two 32x32 query layers at rank 8 (one stopped early) and one 32x128 layer at rank 6."""
    return pd.DataFrame(
        {
            "module": MODULES,
            "loss_rel_svd": [1.0 / (1 + index + layer) for layer in range(len(MODULES))],
            "shape": ["32x32", "32x32", "32x128"],
            "rank": [8, 8, 6],
            "iterations": [3 + index, 5 + index, 2],
            "stop_reason": ["converged", "max_iters", "max_iters"],
        }
    )


def fake_predictions(index: int, labels: np.ndarray = LABELS) -> pd.DataFrame:
    """Row ``index`` gets the first ``20 + 4 * index`` examples right (wrong class after); its
    logits put ``2 + index / 10`` on the predicted class, 0 on the others."""
    right = np.arange(len(labels)) < 20 + 4 * index
    predicted = np.where(right, labels, (labels + 1) % 3).astype(np.int64)
    logits = np.zeros((len(labels), 3), dtype=np.float32)
    logits[np.arange(len(labels)), predicted] = 2 + index / 10
    return pd.DataFrame(
        {
            "id": np.arange(len(labels), dtype=np.int64),
            "label": labels,
            "prediction": predicted,
            "loss": np.where(right, 0.1, 2.0),
            **{f"logit_{k}": logits[:, k] for k in range(3)},
            FINGERPRINT_KEY: FINGERPRINT,
        }
    )


def fake_rank_map(index: int, allocation: str = "uniform") -> pd.DataFrame:
    """The rank map of :func:`fake_report`'s layers; ``global`` keeps the FFN layer dense."""
    shapes, ranks = [(32, 32), (32, 32), (32, 128)], [8, 8 + index, 6]
    dense = [False, False, allocation == "global"]
    rows = []
    for module, (out, in_), rank, kept_dense in zip(MODULES, shapes, ranks, dense, strict=True):
        layer, kind = describe_module(module)
        rank = min(out, in_) if kept_dense else rank
        kept = out * in_ if kept_dense else rank * (out + in_)
        rows.append(
            {
                "module": module,
                "layer": layer,
                "kind": kind,
                "out_features": out,
                "in_features": in_,
                "rank": rank,
                "dense": kept_dense,
                "params_dense": out * in_,
                "params_kept": kept,
                "kept_fraction": kept / (out * in_),
                "rank_fraction": rank / min(out, in_),
                "predicted_loss": 0.0 if kept_dense else 0.01 / rank,
                "allocation": allocation,
                "solver": SOLVERS[index % len(SOLVERS)],
                "curve": "kfwsvd",
                FINGERPRINT_KEY: FINGERPRINT,
            }
        )
    return pd.DataFrame(rows).astype({"layer": "Int64"})


def fake_convergence(index: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            (module, step, 0.1 * step * (1 + index), 2.0 / (1 + step + index))
            for module in MODULES
            for step in range(2)
        ],
        columns=["module", "step", "seconds", "loss"],
    )


def reporting_catalog(tmp_path, namespaces) -> tuple[DataCatalog, dict[str, dict]]:
    catalog = DataCatalog(
        {
            "params:compression": MemoryDataset(
                typed_params("compression", budget=0.5, allocation="uniform")
            ),
            "params:model": MemoryDataset(typed_params("model")),
            "params:data": MemoryDataset(typed_params("data")),
            "params:seed": MemoryDataset(7),
            "params:reporting": MemoryDataset(REPORTING),
            "params:refinement": MemoryDataset(REFINEMENT),
        }
    )
    records = {}
    for index, namespace in enumerate(namespaces):
        records[namespace] = fake_record(index)
        catalog[f"{namespace}.evaluation_metrics"] = records[namespace]
        catalog[f"{namespace}.predictions"] = fake_predictions(index)
        catalog[f"{namespace}.mlflow_run"] = MemoryDataset()
    for index, solver in enumerate(SOLVERS):
        catalog[f"{solver}.layer_report"] = fake_report(index)
        catalog[f"{solver}.rank_map"] = fake_rank_map(index)
        catalog[f"{solver}.convergence"] = fake_convergence(index)
    # Persisted as in the project: the runner releases in-memory data once its consumers ran.
    catalog["comparison_table"] = ParquetDataset(filepath=str(tmp_path / "comparison.parquet"))
    for name in (
        "paired_metrics",
        "comparison_markdown",
        "accuracy_vs_params_plot",
        "layer_loss_plot",
        "convergence_plot",
        "rank_allocation_plot",
    ):
        catalog[name] = MemoryDataset(copy_mode="assign")
    return catalog, records


GROUP_METRICS = {"iterations.32x32", "iterations.32x128"}


def main_table(markdown: str) -> str:
    """The comparison table of ``comparison.md`` (before its paired-tests section)."""
    return markdown.split("## Paired tests")[0]


def test_reporting_pipeline_on_fake_evaluations(tmp_path) -> None:
    catalog, evaluations = reporting_catalog(tmp_path, NAMESPACES)
    SequentialRunner().run(create_pipeline(), catalog)

    records = {namespace: catalog.load(f"{namespace}.mlflow_run") for namespace in NAMESPACES}
    assert len({tuple(sorted(r["params"])) for r in records.values()}) == 1
    solvers = {name: record for name, record in records.items() if name != "dense"}
    # Every solver row has the same metric names; dense lacks only the layer groups' iterations.
    assert len({tuple(sorted(r["metrics"])) for r in solvers.values()}) == 1
    assert set(records["als"]["metrics"]) == set(records["dense"]["metrics"]) | GROUP_METRICS
    assert {k: v for k, v in records["als"]["metrics"].items() if k not in GROUP_METRICS} == (
        evaluations["als"]["metrics"]
    )
    assert records["dense"]["params"]["budget"] == 1.0 and records["als"]["params"]["budget"] == 0.5
    assert records["als"]["params"]["seed"] == 7 and records["als"]["params"]["solver"] == "als"
    assert {record["params"]["refinement"] for record in records.values()} == {"off"}
    assert records["dense"]["tags"] == {"kind": "dense", FINGERPRINT_KEY: FINGERPRINT}
    assert records["als"]["tags"]["kind"] == "solver"
    assert records["dense"]["params"]["allocation"] == "dense"
    assert records["als"]["params"]["allocation"] == "uniform"
    assert records["als"]["params"]["curve_loss_model"] == "kronecker"  # the default
    assert records["dense"]["params"]["curve_loss_model"] == "dense"
    # Each child run carries its own row's predictions, and a solver row its solver's rank map.
    for index, namespace in enumerate(NAMESPACES):
        artifact = records[namespace]["artifacts"]["predictions.parquet"]
        pd.testing.assert_frame_equal(artifact, fake_predictions(index))
    assert set(records["dense"]["artifacts"]) == {"predictions.parquet"}
    pd.testing.assert_frame_equal(
        records["als"]["artifacts"]["rank_map.parquet"], fake_rank_map(SOLVERS.index("als"))
    )

    table = catalog.load("comparison_table")
    assert table["namespace"].tolist() == ["dense", *sorted(SOLVERS)]
    assert not [column for column in table.columns if column.endswith("_refined")]
    assert fingerprint_of(table) == FINGERPRINT
    als = table.set_index("namespace").loc["als"]
    assert als[list(evaluations["als"]["metrics"])].to_dict() == pytest.approx(
        evaluations["als"]["metrics"]
    )
    assert table.columns[:4].tolist() == ["namespace", "accuracy", "f1", "mcc"]
    paired = [f"vs_{ref}_{stat}" for ref in ("fwsvd", "svd") for stat in PAIRED_STATISTICS]
    assert table.columns[-len(paired) - 1 : -1].tolist() == paired
    # The measured damage beside the loss models' prediction of it.
    damage = ["test_loss", "test_loss_increase", "kl_to_dense", "predicted_loss_increase"]
    assert table.columns[4:8].tolist() == damage
    rows = table.set_index("namespace")
    dense_loss = evaluations["dense"]["metrics"]["test_loss"]
    for name, record in evaluations.items():
        increase = record["metrics"]["test_loss"] - dense_loss
        assert rows.at[name, "test_loss_increase"] == pytest.approx(increase), name
        predicted = record["metrics"]["predicted_loss_increase"]
        assert rows.at[name, "predicted_loss_increase"] == predicted, name
    assert rows.at["dense", "kl_to_dense"] == 0.0
    assert (rows.drop(index="dense")["kl_to_dense"] > 0).all()
    markdown = catalog.load("comparison_markdown")
    assert "budget 0.5" in markdown and main_table(markdown).count("\n| ") == len(NAMESPACES) + 1
    assert "budget 0.5, uniform allocation" in markdown.splitlines()[0]
    header = next(line for line in markdown.splitlines() if line.startswith("| namespace |"))
    assert "| kl_to_dense |" in header and "| predicted_loss_increase |" in header
    assert FINGERPRINT_KEY not in markdown and "vs_fwsvd" not in main_table(markdown)
    assert "## Paired tests" in markdown and "500 paired bootstrap resamples" in markdown
    metrics = catalog.load("paired_metrics")
    assert (
        metrics["als.vs_fwsvd.p"]["value"] == table.set_index("namespace").at["als", "vs_fwsvd_p"]
    )
    for name in (
        "accuracy_vs_params_plot",
        "layer_loss_plot",
        "convergence_plot",
        "rank_allocation_plot",
    ):
        assert isinstance(catalog.load(name), Figure)
    assert len(catalog.load("convergence_plot").axes) == 2
    assert len(catalog.load("rank_allocation_plot").axes) == len(SOLVERS)
    # One filled marker per solver; no refined rows, so no hollow ones.
    markers = catalog.load("accuracy_vs_params_plot").axes[0].collections
    assert len(markers) == len(SOLVERS)


def test_refined_rows_are_child_runs_and_rows_of_their_own(tmp_path) -> None:
    default = create_pipeline()
    pipeline = (default - default.only_nodes(*SUMMARY_NODES)) + create_refined_reporting()
    namespaces = (*NAMESPACES, *REFINED_NAMESPACES)
    catalog, evaluations = reporting_catalog(tmp_path, namespaces)
    SequentialRunner().run(pipeline, catalog)

    records = {namespace: catalog.load(f"{namespace}.mlflow_run") for namespace in namespaces}
    assert len({tuple(sorted(r["params"])) for r in records.values()}) == 1
    rows = {name: record for name, record in records.items() if name != "dense"}
    assert len({tuple(sorted(r["metrics"])) for r in rows.values()}) == 1
    for namespace, record in records.items():
        refined = namespace.startswith("refined.")
        assert record["params"]["solver"] == namespace
        assert record["params"]["refinement"] == ("factors, 2 epoch(s)" if refined else "off")
        assert (record["tags"]["kind"] == "refined") == refined
    assert records["refined.als"]["params"]["budget"] == 0.5
    refined_metrics = records["refined.als"]["metrics"]
    assert {k: v for k, v in refined_metrics.items() if k not in GROUP_METRICS} == (
        evaluations["refined.als"]["metrics"]
    )
    # A refined row reports its solver's factorization (the model keeps it).
    assert {k: refined_metrics[k] for k in GROUP_METRICS} == {
        k: records["als"]["metrics"][k] for k in GROUP_METRICS
    }
    assert (
        records["refined.als"]["tags"]["stop_reason.32x32"]
        == (records["als"]["tags"]["stop_reason.32x32"])
    )
    # ... and its rank map.
    pd.testing.assert_frame_equal(
        records["refined.als"]["artifacts"]["rank_map.parquet"],
        records["als"]["artifacts"]["rank_map.parquet"],
    )

    table = catalog.load("comparison_table")
    assert table["namespace"].tolist() == [
        "dense",
        *sorted(SOLVERS),
        *(f"refined.{solver}" for solver in sorted(SOLVERS)),
    ]
    assert not [column for column in table.columns if column.endswith("_refined")]
    markdown = catalog.load("comparison_markdown")
    assert main_table(markdown).count("\n| ") == len(namespaces) + 1
    assert "| refined.svd |" in main_table(markdown)
    paired = markdown.split("## Paired tests")[1]
    assert paired.count("\n| ") == len(namespaces) + 1 and "| refined.svd |" in paired
    metrics = catalog.load("paired_metrics")
    assert {"refined.svd.vs_fwsvd.p", "refined.fwsvd.vs_svd.ci_high"} <= set(metrics)
    # No row is tested against itself.
    assert not {"fwsvd.vs_fwsvd.p", "svd.vs_svd.p"} & set(metrics)

    # Hollow markers for the refined rows, each in its solver's colour and joined to its point.
    axis = catalog.load("accuracy_vs_params_plot").axes[0]
    filled = [points for points in axis.collections if len(points.get_facecolor())]
    hollow = [points for points in axis.collections if not len(points.get_facecolor())]
    assert len(filled) == len(hollow) == len(SOLVERS)
    colours = {tuple(points.get_facecolor()[0]) for points in filled}
    assert {tuple(points.get_edgecolor()[0]) for points in hollow} == colours
    joins = [line for line in axis.lines if line.get_label() != "dense"]
    assert len(joins) == len(SOLVERS)
    rows = table.set_index("namespace")
    for line in joins:
        assert sorted(line.get_ydata()) in [
            sorted([rows.loc[solver, "accuracy"], rows.loc[f"refined.{solver}", "accuracy"]])
            for solver in SOLVERS
        ]
        assert to_rgba(line.get_color()) in colours


def test_child_run_params_come_from_the_typed_blocks() -> None:
    data = typed_params("data", source="glue")
    targets = ["bert.encoder.layer.0.attention.self.query"]
    compression = typed_params("compression", budget=0.3, allocation="uniform", targets=targets)
    model = typed_params("model")
    predictions, report, rank_map = fake_predictions(1), fake_report(1), fake_rank_map(1)
    record = refined_child_run_record(
        fake_record(1),
        predictions,
        report,
        rank_map,
        compression,
        model,
        data,
        3,
        REFINEMENT,
        namespace="refined.svd",
    )
    assert record["params"]["task"] == data.glue.task
    assert record["params"]["targets"] == str(targets)  # as the YAML list reads
    assert record["params"]["refinement"] == REFINEMENT.describe() == "factors, 2 epoch(s)"
    base = child_run_record(
        fake_record(1), predictions, report, rank_map, compression, model, data, 3, namespace="svd"
    )
    assert base["params"]["refinement"] == "off"
    assert set(base["params"]) == set(record["params"])
    assert base["metrics"] == record["metrics"]
    assert base["metrics"] == {
        **fake_metrics(1),
        "iterations.32x32": 6.0,
        "iterations.32x128": 2.0,
    }
    assert base["params"]["allocation"] == record["params"]["allocation"] == "uniform"
    assert base["params"]["rank_rule"] == "floor(budget*out*in/(out+in)) per targeted layer"
    assert set(base["artifacts"]) == {"predictions.parquet", "rank_map.parquet"}
    assert base["artifacts"]["rank_map.parquet"] is rank_map
    dense = dense_child_run_record(fake_record(0), predictions, compression, model, data, 3)
    assert dense["params"]["budget"] == 1.0 and dense["params"]["rank_rule"] == "dense"
    assert dense["params"]["allocation"] == "dense"
    assert set(dense["params"]) == set(base["params"]) and dense["metrics"] == fake_metrics(0)
    assert not [tag for tag in dense["tags"] if tag.startswith("stop_reason.")]
    assert set(dense["artifacts"]) == {"predictions.parquet"}


def test_a_global_allocation_says_so_in_the_child_run_params_and_logs_its_rank_map() -> None:
    compression = typed_params("compression", budget=0.3, allocation="global")
    rank_map = fake_rank_map(2, "global")
    record = child_run_record(
        fake_record(2),
        fake_predictions(2),
        fake_report(2),
        rank_map,
        compression,
        typed_params("model"),
        typed_params("data"),
        0,
        namespace="fwsvd",
    )
    assert record["params"]["allocation"] == "global"
    assert record["params"]["rank_rule"] == "global: min summed predicted loss, params <= uniform's"
    assert record["params"]["budget"] == 0.3
    pd.testing.assert_frame_equal(record["artifacts"]["rank_map.parquet"], rank_map)


def test_child_runs_read_their_solver_layer_report_and_dense_none() -> None:
    (dense,) = create_child_run_pipeline("dense").nodes
    assert dense.inputs[:2] == ["dense.evaluation_metrics", "dense.predictions"]
    assert not [name for name in dense.inputs if name.endswith("layer_report")]
    (refined,) = create_child_run_pipeline("refined.em", refined=True).nodes
    assert refined.inputs[:4] == [
        "refined.em.evaluation_metrics",
        "refined.em.predictions",
        "em.layer_report",
        "em.rank_map",
    ]
    (solver,) = create_child_run_pipeline("em").nodes
    assert solver.inputs[2:4] == ["em.layer_report", "em.rank_map"]
    assert refined.outputs == ["refined.em.mlflow_run"]


def test_layer_groups_report_max_iterations_and_every_stop_reason() -> None:
    # Ranks differ within a shape (a global allocation): the group is the shape alone.
    report = pd.DataFrame(
        {
            "shape": ["384x1536"] * 6 + ["1536x384", "384x384"],
            "rank": [76, 40, 76, 12, 76, 76, 76, 96],
            "iterations": [40, 12, 40, 40, 40, 33, 7, 0],
            "stop_reason": ["max_iters", *["converged"] * 5, "converged", "exact"],
        }
    )
    metrics, tags = layer_group_summary(report)
    assert metrics == {
        "iterations.1536x384": 7.0,
        "iterations.384x1536": 40.0,
        "iterations.384x384": 0.0,
    }
    assert tags == {
        "stop_reason.1536x384": "converged",
        "stop_reason.384x1536": "converged:5,max_iters:1",
        "stop_reason.384x384": "exact",
    }


def test_kl_to_dense_is_the_mean_kl_of_the_softmaxes_by_hand() -> None:
    def table(logits: list[list[float]], prediction=None) -> pd.DataFrame:
        values = np.asarray(logits, dtype=np.float32)
        return pd.DataFrame(
            {
                "id": np.arange(len(values)),
                "label": [1, 0],
                "prediction": values.argmax(axis=1) if prediction is None else prediction,
                "loss": 0.1,
                **{f"logit_{k}": values[:, k] for k in range(values.shape[1])},
            }
        )

    dense = table([[0.0, 1.0], [2.0, 0.0]])
    row = table([[1.0, 0.0], [2.0, 0.0]])
    # Example 1: p = softmax(0, 1), q = softmax(1, 0), so log(p/q) = (-1, +1) and
    # KL = p_1 - p_0 = (e - 1) / (e + 1); example 2 has identical logits: 0.
    expected = (math.e - 1) / (math.e + 1) / 2
    tables = {"dense": dense, "svd": row, "same": dense.copy()}
    assert kl_to_dense(tables) == pytest.approx([0.0, expected, 0.0], rel=1e-12, abs=0)
    assert kl_to_dense(tables)[0] == 0.0 and kl_to_dense(tables)[2] == 0.0
    # The logit columns are read in class order, whatever order they are stored in.
    shuffled = row[["id", "label", "prediction", "loss", "logit_1", "logit_0"]]
    assert kl_to_dense({"dense": dense, "svd": shuffled}) == pytest.approx([0.0, expected])
    # No logits (predictions saved before them, or a regression) or no dense row: NaN.
    old = row.drop(columns=["logit_0", "logit_1"])
    assert np.isnan(kl_to_dense({"dense": dense, "svd": old})[1])
    assert np.isnan(kl_to_dense({"svd": row})).all()
    paired = paired_tests(REPORTING, dense=dense, svd=row).set_index("namespace")
    assert paired["kl_to_dense"].tolist() == pytest.approx([0.0, expected], rel=1e-12)


def test_rank_allocation_plot_has_one_panel_per_solver_and_marks_dense_layers() -> None:
    compression = typed_params("compression", budget=0.3, allocation="global")
    rank_maps = {solver: fake_rank_map(index, "global") for index, solver in enumerate(SOLVERS)}
    figure = rank_allocation_figure(compression, **rank_maps)
    assert isinstance(figure, Figure) and len(figure.axes) == len(SOLVERS)
    assert "global allocation at budget 0.3" in figure.get_suptitle()
    # Per panel one line per kind (query, ffn_out) and the dense FFN layer as one marker at 1.
    first = figure.axes[0]
    assert len(first.lines) == 2
    (dense,) = first.collections
    assert dense.get_offsets().tolist() == [[0.0, 1.0]]
    two = rank_allocation_figure(compression, svd=rank_maps["svd"], fwsvd=rank_maps["fwsvd"])
    assert len(two.axes) == 2


def test_comparison_needs_the_dense_baseline() -> None:
    paired = paired_tests(REPORTING, svd=fake_predictions(0))
    with pytest.raises(ValueError, match="dense evaluation"):
        comparison_table(paired, svd=fake_record(0))


# ----------------------------------------------------------------------------- paired tests


def brute_force_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p: the sum of P(k) over outcomes no more likely than ``wins``."""
    n = wins + losses
    probability = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return sum(p for p in probability if p <= probability[wins] * (1 + 1e-12))


@pytest.mark.parametrize("wins, losses", list(itertools.product(range(9), range(9))))
def test_mcnemar_p_is_the_exact_binomial_sum(wins: int, losses: int) -> None:
    p = mcnemar_exact_p(wins, losses)
    assert p == pytest.approx(brute_force_p(wins, losses), rel=1e-12, abs=1e-15)
    if wins + losses:
        assert p == pytest.approx(stats.binomtest(wins, wins + losses).pvalue, rel=1e-9)
    assert mcnemar_exact_p(losses, wins) == p  # symmetric in the two models


@pytest.mark.parametrize("wins, losses", [(25, 22), (119, 38), (3, 40), (0, 9), (200, 180)])
def test_mcnemar_p_matches_scipy_on_realistic_counts(wins: int, losses: int) -> None:
    assert mcnemar_exact_p(wins, losses) == pytest.approx(
        stats.binomtest(wins, wins + losses).pvalue, rel=1e-9
    )


@pytest.mark.parametrize(
    "wins, losses, n", [(25, 22, 1000), (119, 38, 1000), (5, 0, 40), (0, 0, 10)]
)
def test_bootstrap_interval_holds_the_observed_difference_and_repeats_with_its_seed(
    wins: int, losses: int, n: int
) -> None:
    low, high = bootstrap_diff_interval(wins, losses, n, resamples=2000, seed=3)
    assert low <= (wins - losses) / n <= high
    assert (low, high) == bootstrap_diff_interval(wins, losses, n, resamples=2000, seed=3)
    # A resample draws only outcomes that occurred: no losses, no negative difference.
    assert (losses > 0 or low >= 0) and (wins > 0 or high <= 0)


def test_bootstrap_by_counts_is_the_bootstrap_over_examples() -> None:
    """Drawing (wins, losses, ties) counts is the same distribution as resampling indices."""
    rng = np.random.default_rng(11)
    a, b = rng.random(400) < 0.8, rng.random(400) < 0.7
    by_indices = [
        np.mean(a[idx].astype(int) - b[idx].astype(int))
        for idx in rng.integers(0, 400, size=(20_000, 400))
    ]
    result = paired_comparison(a, b, resamples=20_000, seed=5)
    expected = np.quantile(by_indices, [0.025, 0.975])
    assert result.ci_low == pytest.approx(expected[0], abs=0.006)
    assert result.ci_high == pytest.approx(expected[1], abs=0.006)
    assert result.diff == pytest.approx(a.mean() - b.mean())
    assert result.disagreements == int(np.count_nonzero(a != b)) and result.n == 400


def test_paired_tests_count_wins_and_losses_against_each_reference() -> None:
    # fwsvd is right on the first 24 examples, svd on the first 20, tfwsvd on the first 32.
    predictions = {"fwsvd": fake_predictions(1), "svd": fake_predictions(0)}
    predictions["tfwsvd"] = fake_predictions(3)
    predictions["dense"] = fake_predictions(2).sample(frac=1.0, random_state=0)  # any row order
    table = paired_tests(REPORTING, **predictions).set_index("namespace")
    assert list(table.index) == ["dense", "fwsvd", "svd", "tfwsvd"]
    assert fingerprint_of(table.reset_index()) == FINGERPRINT
    tfwsvd = table.loc["tfwsvd"]
    assert (tfwsvd["vs_fwsvd_wins"], tfwsvd["vs_fwsvd_losses"]) == (8, 0)
    assert (tfwsvd["vs_svd_wins"], tfwsvd["vs_svd_disagreements"]) == (12, 12)
    assert tfwsvd["vs_fwsvd_p"] == pytest.approx(stats.binomtest(8, 8).pvalue)
    assert tfwsvd["vs_fwsvd_diff"] == pytest.approx(8 / EXAMPLES)
    assert tfwsvd["vs_fwsvd_ci_low"] <= 8 / EXAMPLES <= tfwsvd["vs_fwsvd_ci_high"]
    assert table.loc["dense", "vs_fwsvd_wins"] == 4  # rows matched by id, not position
    assert table.loc["svd", "vs_fwsvd_losses"] == 4 and table.loc["svd", "vs_fwsvd_wins"] == 0
    # The reference's own row is missing, not zero.
    assert table.loc["fwsvd", ["vs_fwsvd_wins", "vs_fwsvd_p", "vs_fwsvd_ci_low"]].isna().all()
    assert not table.loc["fwsvd", ["vs_svd_wins", "vs_svd_p"]].isna().any()
    metrics = paired_metrics(table.reset_index())
    assert metrics["tfwsvd.vs_svd.wins"] == {"value": 12.0, "step": 0}
    assert "fwsvd.vs_fwsvd.p" not in metrics
    assert len(metrics) == len(PAIRED_STATISTICS) * (4 * 2 - 2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda frame: frame.iloc[:-1], "59 examples, not 60"),
        (lambda frame: frame.assign(id=frame["id"] + 100), "other example ids"),
        (lambda frame: frame.assign(label=(frame["label"] + 1) % 3), "60 labels differ"),
    ],
)
def test_paired_tests_refuse_predictions_on_another_test_set(change, message) -> None:
    with pytest.raises(ValueError, match=f"one test set.*svd: {message}"):
        paired_tests(REPORTING, fwsvd=fake_predictions(1), svd=change(fake_predictions(0)))


def test_regression_rows_get_no_paired_test_and_the_markdown_says_so(tmp_path) -> None:
    values = np.linspace(0.0, 5.0, 8)
    rows = {}
    for index, name in enumerate(("dense", "fwsvd", "svd")):
        rows[name] = pd.DataFrame(
            {"id": np.arange(8), "label": values, "prediction": values + index, "loss": 1.0}
        )
    paired = paired_tests(REPORTING, **rows)
    # A predicted value has no class distribution to diverge from dense's.
    assert paired.columns.tolist() == ["namespace", "kl_to_dense"]
    assert paired["kl_to_dense"].isna().all()
    assert paired_metrics(paired) == {}
    metrics = {"pearson": 0.9, "spearman": 0.8, "test_loss": 0.1}
    table = comparison_table(paired, **{name: {"metrics": metrics} for name in rows})
    # Records without a predicted loss (older evaluations) give NaN, not a missing column.
    assert table["predicted_loss_increase"].isna().all()
    assert table["test_loss_increase"].tolist() == [0.0, 0.0, 0.0]
    markdown = comparison_markdown(
        table, typed_params("compression", budget=0.5, allocation="uniform"), REPORTING
    )
    assert "Not computed: this is a regression task" in markdown
    assert "| dense |" in main_table(markdown)


def test_markdown_table_formats_floats() -> None:
    text = markdown_table(pd.DataFrame({"a": ["x"], "b": [0.123456]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 0.1235 |"]


# ----------------------------------------------------------------------------- run_history


def log_child(client, experiment, parent, name, budget, metrics, refinement="off") -> None:
    run = client.create_run(
        experiment, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id}
    )
    for key, value in {"solver": name, "budget": budget, "refinement": refinement}.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One run of the old shape (``*_refined`` metrics, budget 0.3), then a default run and a
    refinement run of the new shape (budget 0.5)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("weighted_lowrank")
    old = client.create_run(experiment, run_name="__default__")
    old_refined = {"accuracy_refined": 0.78, "test_loss_refined": 0.4, "refinement_seconds": 9.0}
    log_child(client, experiment, old, "dense", 1.0, {"accuracy": 0.8, "accuracy_refined": 0.8})
    log_child(
        client,
        experiment,
        old,
        "svd",
        0.3,
        {"accuracy": 0.6, "params_ratio_model": 0.7, **old_refined},
        "all, 1 epoch(s)",
    )
    default = client.create_run(experiment, run_name="__default__")
    log_child(client, experiment, default, "dense", 1.0, {"accuracy": 0.81})
    for solver, accuracy in (("svd", 0.65), ("tfwsvd", 0.75)):
        log_child(
            client,
            experiment,
            default,
            solver,
            0.5,
            {"accuracy": accuracy, "params_ratio_model": 0.8},
        )
    refinement = client.create_run(experiment, run_name="refinement")
    log_child(
        client,
        experiment,
        refinement,
        "refined.svd",
        0.5,
        {"accuracy": 0.77, "params_ratio_model": 0.8},
        "all, 1 epoch(s)",
    )
    return uri


def test_child_runs_read_old_refined_metrics_as_refined_rows(store) -> None:
    runs = child_runs(store)
    assert not [column for column in runs.columns if column.endswith("_refined")]
    assert "refinement_seconds" not in runs
    old = runs[runs["budget"] == 0.3].set_index("solver")
    assert old.loc["svd", "accuracy"] == 0.6 and old.loc["svd", "refinement"] == "off"
    assert old.loc["refined.svd", "accuracy"] == 0.78
    assert old.loc["refined.svd", "test_loss"] == 0.4
    assert old.loc["refined.svd", "refinement"] == "all, 1 epoch(s)"
    assert old.loc["refined.svd", "params_ratio_model"] == 0.7
    assert sorted(runs.loc[runs["budget"] == 0.5, "solver"]) == ["refined.svd", "svd", "tfwsvd"]
    # Recorded before the allocation param: the budget was spread uniformly (dense has none).
    allocations = runs.groupby("solver")["allocation"].agg(set).to_dict()
    assert allocations == {
        "dense": {"dense"},
        "svd": {"uniform"},
        "refined.svd": {"uniform"},
        "tfwsvd": {"uniform"},
    }
    # A refined row made from an old run's metrics is no run of its own: no artifacts to read.
    assert old.loc["refined.svd", "run_id"] is None and isinstance(old.loc["svd", "run_id"], str)


def test_budget_table_and_plot_show_refined_rows_beside_their_solver(store) -> None:
    latest = latest_per_budget(child_runs(store))
    assert latest.loc[latest["solver"] == "dense", "accuracy"].tolist() == [0.81]
    wide = with_refined_columns(latest).set_index(["solver", "budget"])
    assert "refined.svd" not in wide.index.get_level_values("solver")
    assert wide.loc[("svd", 0.5), "accuracy_refined"] == 0.77
    assert pd.isna(wide.loc[("tfwsvd", 0.5), "accuracy_refined"])

    summary = budget_table(latest)
    assert list(summary.index) == ["dense", "svd", "tfwsvd"]
    assert list(summary.columns) == [
        ("accuracy", 0.3),
        ("accuracy", 0.5),
        ("accuracy", 1.0),
        ("accuracy_refined", 0.3),
        ("accuracy_refined", 0.5),
    ]
    assert summary.loc["svd", ("accuracy_refined", 0.5)] == 0.77
    assert summary.loc["svd", ("accuracy_refined", 0.3)] == 0.78

    lines = {line.get_label(): line for line in quality_vs_params_figure(latest).axes[0].lines}
    assert {"svd", "svd refined", "tfwsvd"} <= set(lines) and "tfwsvd refined" not in lines
    assert list(lines["svd refined"].get_ydata()) == [0.78, 0.77]
    assert lines["svd refined"].get_color() == lines["svd"].get_color()


def test_refined_only_keeps_the_solvers_that_were_refined(store) -> None:
    latest = latest_per_budget(child_runs(store), refined_only=True)
    assert sorted(latest["solver"]) == ["dense", "refined.svd", "refined.svd", "svd", "svd"]
    runs = child_runs(store)
    with pytest.raises(ValueError, match="--pipelines refined"):
        latest_per_budget(runs[~runs["solver"].str.startswith("refined.")], refined_only=True)
