"""The factorization pipeline: one namespace per solver on a tiny random BERT, in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from kedro.io import DataCatalog

from tests.conftest import make_tiny_bundle
from tests.pipelines.conftest import BUDGET, make_fisher_information
from weighted_lowrank.lowrank.objective import rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.solvers import SOLVERS, factorize, solver_options
from weighted_lowrank.lowrank.surgery import lowrank_modules
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.pipelines.factorization import create_pipeline
from weighted_lowrank.pipelines.factorization.nodes import compress


def test_one_namespace_per_solver_sharing_model_fisher_and_budget():
    pipeline = create_pipeline()
    assert {node.name for node in pipeline.nodes} == {f"{solver}.compress" for solver in SOLVERS}
    assert pipeline.inputs() == {"fine_tuned_model", "fisher_information", "params:compression"} | {
        f"params:{solver}.options" for solver in SOLVERS
    }
    assert pipeline.outputs() == {
        f"{solver}.{name}" for solver in SOLVERS for name in ("compressed_model", "layer_report")
    }


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
            assert report["loss_rel_svd"].tolist() == pytest.approx([1.0] * len(report))


def test_the_fine_tuned_model_is_left_dense(factorized):
    bundle, _, catalog = factorized
    assert not lowrank_modules(catalog.load("fine_tuned_model").model)
    assert not lowrank_modules(bundle.model)


def test_fisher_of_another_model_is_rejected():
    bundle = make_tiny_bundle(seed=1)
    stale = make_fisher_information(make_tiny_bundle(seed=2).model)
    compression = {"budget": BUDGET, "targets": None, "seed": 0, "device": "cpu"}
    with pytest.raises(ValueError, match="fisher_information was estimated on model"):
        compress(bundle, stale, compression, {}, solver="svd")
    with pytest.raises(ValueError, match="compression"):
        compress(
            bundle,
            make_fisher_information(bundle.model),
            {"budget": BUDGET, "rank": 3},
            {},
            solver="svd",
        )
    with pytest.raises(ValueError, match="fisher_information must be"):
        compress(bundle, {"bert.pooler.dense.weight": torch.ones(1)}, compression, {}, solver="svd")


def test_catalog_patterns_persist_each_solver_separately(factorized, tmp_path, monkeypatch):
    config = yaml.safe_load(
        (Path(__file__).parents[2] / "conf" / "base" / "catalog_factorization.yml").read_text()
    )
    monkeypatch.chdir(tmp_path)
    catalog = DataCatalog.from_config(config)
    bundle, _, memory = factorized
    texts = bundle.tokenizer(["good film", "awful plot"], return_tensors="pt", padding=True)
    for solver in ("svd", "fwsvd"):
        catalog.save(f"{solver}.compressed_model", memory.load(f"{solver}.compressed_model"))
        catalog.save(f"{solver}.layer_report", memory.load(f"{solver}.layer_report"))
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
    ) == [
        "fwsvd",
        "svd",
    ]


def test_every_solver_has_an_options_block_its_solver_accepts():
    parameters = yaml.safe_load(
        (Path(__file__).parents[2] / "conf" / "base" / "parameters_factorization.yml").read_text()
    )
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    for solver in SOLVERS:
        options = parameters[solver]["options"]
        assert set(options) <= set(solver_options(solver)), solver
        result = factorize(weight, torch.rand(6, 5) + 0.1, 2, solver=solver, **options)
        assert result.left.shape == (6, 2) and result.right.shape == (2, 5), solver
