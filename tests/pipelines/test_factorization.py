"""The factorization pipeline: one namespace per solver on a tiny random BERT, in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from kedro.io import DataCatalog

from tests.conftest import typed_params
from tests.pipelines.conftest import BUDGET
from weighted_lowrank.lowrank.compression import svd_reference_losses
from weighted_lowrank.lowrank.layer import lowrank_modules
from weighted_lowrank.lowrank.objective import rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.solvers import SOLVERS, factorize, solver_options
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.pipelines.factorization import create_pipeline
from weighted_lowrank.pipelines.factorization.nodes import (
    allocate,
    compress,
    loss_curves,
    svd_reference,
)

#: The report's columns before stop_reason and the info_<key> columns, in order.
REPORT_COLUMNS = [
    "module",
    "budget",
    "shape",
    "out_features",
    "in_features",
    "rank",
    "params_before",
    "params_after",
    "weighted_loss",
    "svd_loss",
    "loss_rel_svd",
    "initial_loss",
    "seconds",
    "total_seconds",
    "iterations",
    "stop_reason",
    "solver",
    "predicted_loss",
    "diagonal_loss",
]
COMPRESSION = typed_params(
    "compression",
    budget=BUDGET,
    allocation="uniform",
    curve_loss_model="own",
    seed=0,
    device="cpu",
)
#: The svd solver needs no calibration statistics.
STATISTICS = {"tensors": {}, "metadata": {}}


def rank_map_for(bundle, fisher_information, compression, solver="svd", statistics=STATISTICS):
    """The rank map the solver's namespace would make (curves, then the allocation)."""
    curves = loss_curves(bundle, fisher_information, statistics, compression, {}, solver=solver)
    reference = svd_reference(bundle, fisher_information, compression)
    return allocate(curves, reference, compression, solver=solver)


def test_one_namespace_per_solver_sharing_model_fisher_budget_and_svd_reference():
    pipeline = create_pipeline()
    assert {node.name for node in pipeline.nodes} == {"svd_reference"} | {
        f"{solver}.{name}" for solver in SOLVERS for name in ("loss_curves", "allocate", "compress")
    }
    assert pipeline.inputs() == {
        "fine_tuned_model",
        "fisher_information",
        "calibration_statistics",
        "params:compression",
    } | {f"params:{solver}.options" for solver in SOLVERS}
    assert "svd_reference_loss" in pipeline.all_outputs()
    assert pipeline.outputs() == {
        f"{solver}.{name}"
        for solver in SOLVERS
        for name in ("compressed_model", "layer_report", "convergence")
    }
    for solver in SOLVERS:
        (compress_node,) = [node for node in pipeline.nodes if node.name == f"{solver}.compress"]
        assert {"svd_reference_loss", f"{solver}.rank_map"} <= set(compress_node.inputs)


def test_svd_reference_is_plain_svd_per_layer_and_every_report_uses_it(factorized):
    bundle, fisher_information, catalog = factorized
    table = svd_reference(bundle, fisher_information, COMPRESSION)
    assert table.columns.tolist() == ["module", "rank", "svd_loss"]
    assert table["svd_loss"].dtype == np.float64
    expected = svd_reference_losses(bundle.model, fisher_information["tensors"], BUDGET)
    assert dict(zip(table["module"], table["svd_loss"], strict=True)) == expected
    for solver in SOLVERS:
        report = catalog.load(f"{solver}.layer_report")
        assert report["svd_loss"].tolist() == table["svd_loss"].tolist(), solver


def test_report_columns_are_typed_with_no_json(factorized):
    _, _, catalog = factorized
    for solver in SOLVERS:
        report = catalog.load(f"{solver}.layer_report")
        columns = report.columns.tolist()
        assert columns[: len(REPORT_COLUMNS)] == REPORT_COLUMNS, solver
        assert all(column.startswith("info_") for column in columns[len(REPORT_COLUMNS) :])
        assert "history" not in columns and "info" not in columns
        for column in ("out_features", "in_features", "rank", "params_before", "iterations"):
            assert report[column].dtype == np.int64, (solver, column)
        for column in ("budget", "weighted_loss", "svd_loss", "loss_rel_svd", "seconds"):
            assert report[column].dtype == np.float64, (solver, column)
        assert report["total_seconds"].nunique() == 1
        assert report["seconds"].sum() <= report["total_seconds"].iloc[0] + 1e-9
        for column in columns:
            text = [value for value in report[column] if isinstance(value, str)]
            assert not any(value.startswith(("[", "{")) for value in text), (solver, column)
        assert set(report["stop_reason"]) <= {"converged", "max_iters", "max_seconds", "exact"}
    info = catalog.load("adam_sgd.layer_report")
    for key in ("switch_iteration", "swats_lr", "sgd_lr", "lambda_max"):
        assert info[f"info_{key}"].dtype == np.float64, key


def test_convergence_has_one_row_per_history_point(factorized):
    bundle, fisher_information, catalog = factorized
    for solver in SOLVERS:
        table = catalog.load(f"{solver}.convergence")
        report = catalog.load(f"{solver}.layer_report")
        assert table.columns.tolist() == ["module", "step", "seconds", "loss"]
        assert table["step"].dtype == np.int64 and table["loss"].dtype == np.float64
        assert table["module"].unique().tolist() == report["module"].tolist()
        for module, history in table.groupby("module", sort=False):
            assert history["step"].tolist() == list(range(len(history))), (solver, module)
            assert history["seconds"].is_monotonic_increasing, (solver, module)
        iterations = dict(zip(report["module"], report["iterations"], strict=True))
        first = table[table["step"] == 0].set_index("module")["loss"]
        initial = report.set_index("module")["initial_loss"]
        pd.testing.assert_series_equal(first, initial, check_names=False, rtol=1e-4)
        if solver in ("svd", "fwsvd"):
            assert table.groupby("module").size().eq(1).all() and set(iterations.values()) == {0}
    # One row per history point: the node's table is exactly the flattened histories.
    compressed, report, table = compress(
        bundle,
        fisher_information,
        catalog.load("calibration_statistics"),
        svd_reference(bundle, fisher_information, COMPRESSION),
        rank_map_for(bundle, fisher_information, COMPRESSION, "adam"),
        COMPRESSION,
        {"max_iters": 2},
        solver="adam",
    )
    assert len(table) == table.groupby("module").size().sum() > len(report)


def test_every_solver_compresses_every_target_at_the_budget_rank(factorized):
    bundle, fisher_information, catalog = factorized
    targets = select_linear_modules(bundle.model)
    fisher = fisher_information["tensors"]
    for solver in SOLVERS:
        compressed = catalog.load(f"{solver}.compressed_model")
        report = catalog.load(f"{solver}.layer_report")
        layers = lowrank_modules(compressed.model)
        assert list(layers) == list(targets) == report["module"].tolist(), solver
        assert compressed.tokenizer is not None
        for row in report.itertuples():
            dense = targets[row.module]
            rank = rank_for_budget(tuple(dense.weight.shape), BUDGET)
            assert layers[row.module].rank == row.rank == rank, (solver, row.module)
            assert row.budget == BUDGET and row.solver == solver
            recomputed = weighted_loss(
                dense.weight,
                fisher[f"{row.module}.weight"],
                layers[row.module].left.weight,
                layers[row.module].right.weight,
            )
            assert row.weighted_loss == pytest.approx(recomputed, rel=1e-4), (solver, row.module)
            assert row.weighted_loss <= row.initial_loss * (1 + 1e-6), (solver, row.module)
            assert row.loss_rel_svd == pytest.approx(row.weighted_loss / row.svd_loss)
        if solver == "svd":
            assert report["loss_rel_svd"].tolist() == [1.0] * len(report)


def test_the_fine_tuned_model_is_left_dense(factorized):
    bundle, _, catalog = factorized
    assert not lowrank_modules(catalog.load("fine_tuned_model").model)
    assert not lowrank_modules(bundle.model)


def test_layers_missing_from_the_svd_reference_or_at_another_rank_get_their_svd_loss_computed(
    factorized,
):
    bundle, fisher_information, catalog = factorized
    rank_map = rank_map_for(bundle, fisher_information, COMPRESSION)
    expected = catalog.load("svd.layer_report")["svd_loss"].tolist()
    other = COMPRESSION.model_copy(update={"budget": BUDGET / 2})
    for reference in (
        svd_reference(bundle, fisher_information, COMPRESSION).iloc[1:],
        svd_reference(bundle, fisher_information, other),
    ):
        _, report, _ = compress(
            bundle,
            fisher_information,
            STATISTICS,
            reference,
            rank_map,
            COMPRESSION,
            {},
            solver="svd",
        )
        assert report["svd_loss"].tolist() == pytest.approx(expected, rel=1e-12)
        assert report["loss_rel_svd"].tolist() == pytest.approx([1.0] * len(report))


def test_the_seed_makes_the_node_reproducible(factorized):
    bundle, fisher_information, catalog = factorized
    reference = svd_reference(bundle, fisher_information, COMPRESSION)
    options = {"max_iters": 3, "init": "random"}
    rank_map = rank_map_for(bundle, fisher_information, COMPRESSION, "adam")
    runs = [
        compress(
            bundle,
            fisher_information,
            STATISTICS,
            reference,
            rank_map,
            COMPRESSION,
            options,
            solver="adam",
        )
        for _ in range(2)
    ]
    columns = ["weighted_loss", "initial_loss", "loss_rel_svd"]
    pd.testing.assert_frame_equal(runs[0][1][columns], runs[1][1][columns])
    assert runs[0][0].tokenizer is bundle.tokenizer


def test_catalog_patterns_persist_each_solver_separately(factorized, tmp_path, monkeypatch):
    config = yaml.safe_load(
        (Path(__file__).parents[2] / "conf" / "base" / "catalog_factorization.yml").read_text()
    )
    monkeypatch.chdir(tmp_path)
    catalog = DataCatalog.from_config(config)
    bundle, fisher_information, memory = factorized
    texts = bundle.tokenizer(["good film", "awful plot"], return_tensors="pt", padding=True)
    reference = svd_reference(bundle, fisher_information, COMPRESSION)
    catalog.save("svd_reference_loss", reference)
    pd.testing.assert_frame_equal(catalog.load("svd_reference_loss"), reference)
    assert (tmp_path / "data" / "04_feature" / "svd_reference_loss.parquet").is_file()
    for solver in ("svd", "fwsvd", "adam_sgd"):
        catalog.save(f"{solver}.compressed_model", memory.load(f"{solver}.compressed_model"))
        for name in ("layer_report", "convergence", "loss_curves", "rank_map"):
            catalog.save(f"{solver}.{name}", memory.load(f"{solver}.{name}"))
            pd.testing.assert_frame_equal(
                catalog.load(f"{solver}.{name}"), memory.load(f"{solver}.{name}")
            )
        assert (tmp_path / "data" / "07_model_output" / solver / "convergence.parquet").is_file()
        # The rank map is versioned, beside the compressed model it made.
        versions = tmp_path / "data" / "07_model_output" / solver / "rank_map.parquet"
        assert len(list(versions.iterdir())) == 1
    for solver in ("svd", "fwsvd"):
        reloaded = catalog.load(f"{solver}.compressed_model").model
        expected = memory.load(f"{solver}.compressed_model").model
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(**texts).logits, expected(**texts).logits, atol=1e-5, rtol=0
            )
        assert {name: m.rank for name, m in lowrank_modules(reloaded).items()} == dict(
            zip(*catalog.load(f"{solver}.layer_report")[["module", "rank"]].T.values, strict=True)
        )
    assert sorted(
        path.name for path in (tmp_path / "data" / "06_models" / "compressed").iterdir()
    ) == ["adam_sgd", "fwsvd", "svd"]


def test_every_solver_has_an_options_block_its_solver_accepts():
    parameters = yaml.safe_load(
        (Path(__file__).parents[2] / "conf" / "base" / "parameters_factorization.yml").read_text()
    )
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    statistics = {
        "input_moment": torch.eye(5),
        "output_moment": torch.eye(6),
        "input_abs_mean": torch.ones(5),
    }
    for solver in SOLVERS:
        options = parameters[solver]["options"]
        assert set(options) <= set(solver_options(solver)), solver
        result = factorize(
            weight, torch.rand(6, 5) + 0.1, 2, solver=solver, statistics=statistics, **options
        )
        assert result.left.shape == (6, 2) and result.right.shape == (2, 5), solver
