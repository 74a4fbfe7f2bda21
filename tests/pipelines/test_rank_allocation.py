"""Global rank allocation through the factorization pipeline: budgets, losses, the chain
curve → allocation → factorization, and evaluation's check of the rank map."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node
from kedro.runner import SequentialRunner
from torch import nn

from tests.conftest import TOY_NEGATIVE, TOY_POSITIVE, typed_params
from tests.pipelines.conftest import BUDGET, factorization_catalog, fast_options
from weighted_lowrank.kedro_glue.hooks import SavedVersionChecks
from weighted_lowrank.lowrank.layer import LowRankLinear, lowrank_modules
from weighted_lowrank.lowrank.objective import rank_for_budget
from weighted_lowrank.lowrank.serialization import tensors_for_saving
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.pipelines.evaluation.nodes import evaluate_compressed
from weighted_lowrank.pipelines.factorization import create_pipeline
from weighted_lowrank.pipelines.factorization import nodes as factorization_nodes
from weighted_lowrank.pipelines.factorization.nodes import (
    allocate,
    compress,
    loss_curves,
    svd_reference,
)

GLOBAL = typed_params(
    "compression", budget=BUDGET, allocation="global", curve_loss_model="own", seed=0, device="cpu"
)
UNIFORM = typed_params(
    "compression", budget=BUDGET, allocation="uniform", curve_loss_model="own", seed=0, device="cpu"
)
MODEL = typed_params("model", max_length=16)
EVALUATION = typed_params(
    "evaluation",
    batch_size=4,
    device="cpu",
    latency={
        "batch_size": 2,
        "sequence_length": 8,
        "repeats": 2,
        "warmup": 1,
        "threads": None,
        "seed": 0,
    },
)
TEST_SPLIT = pd.DataFrame(
    {"text": TOY_POSITIVE + TOY_NEGATIVE, "label": [1, 1, 1, 0, 0, 0]},
)


@pytest.fixture(scope="session")
def allocated(factorized):
    """The factorization pipeline with ``allocation: global`` on the bundle and Fisher of the
    (uniform) ``factorized`` fixture: (bundle, fisher, global catalog, uniform catalog)."""
    bundle, fisher_information, uniform = factorized
    catalog = factorization_catalog(bundle, fisher_information, BUDGET, allocation="global")
    SequentialRunner().run(create_pipeline(), catalog)
    return bundle, fisher_information, catalog, uniform


def weight_parameters(model: nn.Module, modules) -> int:
    """Weight elements (no biases) the saved model holds under ``modules``."""
    tensors, _ = tensors_for_saving(model)
    prefixes = tuple(f"{name}." for name in modules)
    return sum(
        tensor.numel()
        for key, tensor in tensors.items()
        if key.startswith(prefixes) and not key.endswith(".bias")
    )


def num_examples(fisher_information) -> int:
    return int(fisher_information["metadata"]["num_examples"])


def predicted_from_factors(solver, dense, layer, importance, statistics, name, examples):
    """½·(ΣI/N)·‖S_out ΔW S_in‖² / (tr_out·tr_in) of the compressed layer, float64."""
    weight = dense.weight.detach().double()
    delta = weight - layer.left.weight.detach().double() @ layer.right.weight.detach().double()
    out_features, in_features = weight.shape
    if solver == "svd":
        value, traces = delta.square().sum(), out_features * in_features
    elif solver == "kfwsvd":
        moment_in = statistics[f"{name}.input_moment"].double()
        moment_out = statistics[f"{name}.output_moment"].double()
        value = torch.trace(delta.T @ moment_out @ delta @ moment_in)
        traces = torch.trace(moment_out) * torch.trace(moment_in)
    else:
        raise AssertionError(solver)
    return float(0.5 * importance.double().sum() / examples * value / traces)


def forced_dense_rank_map(catalog, solver, modules) -> pd.DataFrame:
    """A global rank map of ``solver`` where ``modules``' curves are made so steep that the
    allocation keeps them dense (the curves of the others as the pipeline made them)."""
    curves = catalog.load(f"{solver}.loss_curves")
    steep = curves["module"].isin(modules)
    curves.loc[steep, "predicted_loss"] = curves.loc[steep, "predicted_loss"] * 1e4
    reference = catalog.load("svd_reference_loss")
    rank_map = allocate(curves, reference, GLOBAL, solver=solver)
    assert rank_map.set_index("module").loc[list(modules), "dense"].all()
    return rank_map


def compress_with_dense_layers(allocated, solver, modules, options=None):
    """``compress`` at :func:`forced_dense_rank_map`'s ranks: (rank map, compressed, report)."""
    bundle, fisher_information, catalog, _ = allocated
    rank_map = forced_dense_rank_map(catalog, solver, modules)
    compressed, report, _ = compress(
        bundle,
        fisher_information,
        catalog.load("calibration_statistics"),
        svd_reference(bundle, fisher_information, GLOBAL),
        rank_map,
        GLOBAL,
        options or {},
        solver=solver,
    )
    return rank_map, compressed, report


def test_the_global_maps_keep_at_most_the_uniform_parameters(allocated):
    bundle, _, catalog, uniform = allocated
    for solver in SOLVERS:
        global_map = catalog.load(f"{solver}.rank_map")
        uniform_map = uniform.load(f"{solver}.rank_map")
        assert set(global_map["allocation"]) == {"global"}, solver
        assert set(uniform_map["allocation"]) == {"uniform"}, solver
        assert global_map["module"].tolist() == uniform_map["module"].tolist()
        max_parameters = int(global_map["max_parameters"].iloc[0])
        assert set(global_map["max_parameters"]) == set(uniform_map["max_parameters"])
        assert global_map["params_kept"].sum() <= max_parameters, solver
        assert uniform_map["params_kept"].sum() == max_parameters, solver
        # Every row's params_kept is its rank's cost (dense: out·in).
        for row in global_map.itertuples():
            expected = (
                row.out_features * row.in_features
                if row.dense
                else row.rank * (row.out_features + row.in_features)
            )
            assert row.params_kept == expected, (solver, row.module)
        # The saved models hold exactly those weight parameters in the targeted layers.
        modules = global_map["module"].tolist()
        for rank_map, run in ((global_map, catalog), (uniform_map, uniform)):
            model = run.load(f"{solver}.compressed_model").model
            assert weight_parameters(model, modules) == rank_map["params_kept"].sum(), solver
        assert weight_parameters(catalog.load(f"{solver}.compressed_model").model, modules) <= (
            weight_parameters(uniform.load(f"{solver}.compressed_model").model, modules)
        )
        # The budget is spent: no layer could get one more rank within it.
        slack = max_parameters - global_map["params_kept"].sum()
        assert slack < (global_map["out_features"] + global_map["in_features"]).min(), solver


def test_the_curves_do_not_depend_on_the_allocation(allocated):
    _, _, catalog, uniform = allocated
    for solver in SOLVERS:
        columns = ["module", "out_features", "in_features", "rank", "params", "predicted_loss"]
        pd.testing.assert_frame_equal(
            catalog.load(f"{solver}.loss_curves")[columns],
            uniform.load(f"{solver}.loss_curves")[columns],
        )


def test_the_global_predicted_loss_is_at_most_the_uniform_one(allocated):
    _, _, catalog, uniform = allocated
    strictly = 0
    for solver in SOLVERS:
        global_loss = catalog.load(f"{solver}.rank_map")["predicted_loss"].sum()
        uniform_loss = uniform.load(f"{solver}.rank_map")["predicted_loss"].sum()
        assert global_loss <= uniform_loss * (1 + 1e-12), solver
        strictly += global_loss < uniform_loss * (1 - 1e-6)
        # The map's predicted loss is the curve at its rank.
        curves = catalog.load(f"{solver}.loss_curves").set_index(["module", "rank"])
        for row in catalog.load(f"{solver}.rank_map").itertuples():
            expected = 0.0 if row.dense else curves.at[(row.module, row.rank), "predicted_loss"]
            assert row.predicted_loss == expected, (solver, row.module)
    # Random layers differ enough for the allocation to move ranks somewhere.
    assert strictly >= 1


def check_compressed_matches_rank_map(compressed: nn.Module, dense: nn.Module, rank_map) -> None:
    for row in rank_map.itertuples():
        layer = compressed.get_submodule(row.module)
        original = dense.get_submodule(row.module)
        if row.dense:
            assert type(layer) is nn.Linear, row.module
            assert torch.equal(layer.weight, original.weight), row.module
        else:
            assert isinstance(layer, LowRankLinear), row.module
            assert layer.rank == row.rank, row.module
            assert (layer.out_features, layer.in_features) == (row.out_features, row.in_features)


def test_the_compressed_layers_have_the_rank_maps_ranks(allocated):
    bundle, _, catalog, _ = allocated
    for solver in SOLVERS:
        rank_map = catalog.load(f"{solver}.rank_map")
        compressed = catalog.load(f"{solver}.compressed_model").model
        check_compressed_matches_rank_map(compressed, bundle.model, rank_map)
        report = catalog.load(f"{solver}.layer_report")
        factorized = rank_map[~rank_map["dense"]]
        assert report["module"].tolist() == factorized["module"].tolist(), solver
        assert report["rank"].tolist() == factorized["rank"].tolist(), solver


@pytest.mark.parametrize("solver", ["svd", "kfwsvd"])
def test_layers_an_allocation_keeps_dense_stay_linear(allocated, solver):
    bundle = allocated[0]
    targets = list(select_linear_modules(bundle.model))
    kept = [targets[1], targets[4]]  # an attention projection and an FFN input layer
    rank_map, compressed, report = compress_with_dense_layers(
        allocated, solver, kept, fast_options(solver)
    )
    assert rank_map["params_kept"].sum() <= rank_map["max_parameters"].iloc[0]
    check_compressed_matches_rank_map(compressed.model, bundle.model, rank_map)
    assert set(lowrank_modules(compressed.model)) == set(targets) - set(kept)
    assert report["module"].tolist() == [name for name in targets if name not in kept]
    assert weight_parameters(compressed.model, targets) == rank_map["params_kept"].sum()


@pytest.mark.parametrize("solver", ["svd", "kfwsvd"])
def test_the_reported_predicted_loss_is_the_loss_of_the_compressed_factors(allocated, solver):
    """Curve → allocation → factorization: the rank map's predicted loss of each layer is the
    solver's own objective of the factors in the compressed model, trace-scaled."""
    bundle, fisher_information, catalog, _ = allocated
    report = catalog.load(f"{solver}.layer_report")
    rank_map = catalog.load(f"{solver}.rank_map").set_index("module")
    compressed = catalog.load(f"{solver}.compressed_model").model
    statistics = catalog.load("calibration_statistics")["tensors"]
    fisher = fisher_information["tensors"]
    examples = num_examples(fisher_information)
    assert len(report) == len(rank_map)
    for row in report.itertuples():
        assert row.predicted_loss == rank_map.at[row.module, "predicted_loss"]
        recomputed = predicted_from_factors(
            solver,
            bundle.model.get_submodule(row.module),
            compressed.get_submodule(row.module),
            fisher[f"{row.module}.weight"],
            statistics,
            row.module,
            examples,
        )
        # float32 factors; kfwsvd's 1e-6 relative damping of the moments.
        assert row.predicted_loss == pytest.approx(recomputed, rel=1e-4), (solver, row.module)
        # The diagonal Fisher's loss beside it, in the same units.
        assert row.diagonal_loss == pytest.approx(0.5 * row.weighted_loss / examples)


def test_the_uniform_map_is_rank_for_budget_in_every_layer(allocated):
    bundle, _, _, uniform = allocated
    targets = select_linear_modules(bundle.model)
    for solver in SOLVERS:
        rank_map = uniform.load(f"{solver}.rank_map")
        assert rank_map["module"].tolist() == list(targets), solver
        assert not rank_map["dense"].any(), solver
        for row in rank_map.itertuples():
            shape = tuple(targets[row.module].weight.shape)
            assert row.rank == rank_for_budget(shape, BUDGET), (solver, row.module)
            assert row.params_kept == row.rank * sum(shape)
            assert row.budget == BUDGET and row.solver == solver


def test_a_nan_in_the_curves_stops_the_run_before_any_factorization(allocated, monkeypatch):
    bundle, fisher_information, catalog, _ = allocated
    curves = catalog.load("svd.loss_curves")
    module = curves["module"].iloc[0]
    at = curves.index[(curves["module"] == module) & (curves["rank"] == 3)]
    curves.loc[at, "predicted_loss"] = np.nan
    message = rf"layer '{re.escape(module)}' \(32x32\) predicts loss nan at rank 3"
    with pytest.raises(ValueError, match=message):
        allocate(curves, catalog.load("svd_reference_loss"), GLOBAL, solver="svd")
    with pytest.raises(ValueError, match=message):
        allocate(curves, catalog.load("svd_reference_loss"), UNIFORM, solver="svd")
    # In a run: allocate fails, compress never factorizes.
    calls = []
    monkeypatch.setattr(
        factorization_nodes, "factorize_model", lambda *args, **kwargs: calls.append(args)
    )
    run = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(bundle),
            "fisher_information": MemoryDataset(fisher_information),
            "calibration_statistics": MemoryDataset(catalog.load("calibration_statistics")),
            "svd_reference_loss": MemoryDataset(svd_reference(bundle, fisher_information, GLOBAL)),
            "svd.loss_curves": MemoryDataset(curves),
            "params:compression": MemoryDataset(GLOBAL),
            "params:svd.options": MemoryDataset({}),
        }
    )
    pipeline = create_pipeline().only_nodes("svd.allocate", "svd.compress")
    with pytest.raises(ValueError, match=message):
        SequentialRunner().run(pipeline, run)
    assert calls == []


def test_a_budget_below_rank_one_everywhere_names_a_layer(allocated):
    bundle, _, catalog, _ = allocated
    targets = list(select_linear_modules(bundle.model))
    curves = catalog.load("svd.loss_curves")
    names = "|".join(re.escape(name) for name in targets)
    for allocation in ("global", "uniform"):
        tiny = typed_params(
            "compression",
            budget=0.02,
            allocation=allocation,
            curve_loss_model="own",
            seed=0,
            device="cpu",
        )
        with pytest.raises(ValueError, match=rf"budget 0\.02 gives rank 0 for layer '({names})'"):
            allocate(curves, catalog.load("svd_reference_loss"), tiny, solver="svd")


def evaluate(compressed, bundle, report, rank_map):
    return evaluate_compressed(compressed, bundle, report, rank_map, TEST_SPLIT, MODEL, EVALUATION)[
        0
    ]["metrics"]


def test_the_rank_map_of_the_other_allocation_is_refused_before_evaluation(allocated):
    """The pairing of a compressed model and its rank map is checked by the SavedVersionChecks
    hook before the evaluation node runs (the node trusts its inputs)."""
    bundle, _, catalog, uniform = allocated
    checks = SavedVersionChecks()
    for solver in ("svd", "kfwsvd"):
        global_map = catalog.load(f"{solver}.rank_map")
        uniform_map = uniform.load(f"{solver}.rank_map")
        assert global_map["rank"].tolist() != uniform_map["rank"].tolist(), solver
        node = _evaluate_node(solver)
        for compressed, wrong in ((catalog, uniform_map), (uniform, global_map)):
            inputs = {
                f"{solver}.compressed_model": compressed.load(f"{solver}.compressed_model"),
                f"{solver}.rank_map": wrong,
            }
            with pytest.raises(ValueError, match="are not one pair"):
                checks.before_node_run(node=node, catalog=compressed, inputs=inputs)
    # A layer the map keeps dense but the model factorized is refused too.
    targets = list(select_linear_modules(bundle.model))
    inputs = {
        "svd.compressed_model": catalog.load("svd.compressed_model"),
        "svd.rank_map": forced_dense_rank_map(catalog, "svd", [targets[1]]),
    }
    with pytest.raises(ValueError, match=re.escape(targets[1])):
        checks.before_node_run(node=_evaluate_node("svd"), catalog=catalog, inputs=inputs)


def _evaluate_node(solver: str) -> Node:
    inputs = [f"{solver}.compressed_model", f"{solver}.rank_map"]
    return Node(lambda *args: None, inputs, None, name=f"{solver}.evaluate")


def test_evaluation_counts_the_layers_kept_dense(allocated):
    bundle, _, catalog, _ = allocated
    targets = select_linear_modules(bundle.model)
    names = list(targets)
    kept = [names[1], names[4]]
    rank_map, compressed, report = compress_with_dense_layers(allocated, "svd", kept)
    metrics = evaluate(compressed, bundle, report, rank_map)
    # By hand, from the shapes and ranks: every targeted layer's weight and bias.
    ranks = dict(zip(rank_map["module"], rank_map["rank"], strict=True))
    before = after = factorized_only = 0
    for name, module in targets.items():
        out_features, in_features = module.weight.shape
        bias = 0 if module.bias is None else out_features
        before += out_features * in_features + bias
        if name in kept:
            after += out_features * in_features + bias
        else:
            cost = ranks[name] * (out_features + in_features) + bias
            after += cost
            factorized_only += cost
    assert metrics["params_kept"] == after > factorized_only
    assert metrics["params_ratio_layers"] == pytest.approx(after / before, rel=1e-12)
    assert metrics["predicted_loss_increase"] == pytest.approx(rank_map["predicted_loss"].sum())
    # The pipeline's global model: the same count with no dense layer.
    pipeline_map = catalog.load("svd.rank_map")
    pipeline_metrics = evaluate(
        catalog.load("svd.compressed_model"), bundle, catalog.load("svd.layer_report"), pipeline_map
    )
    biases = sum(module.out_features for module in targets.values())
    assert pipeline_metrics["params_kept"] == pipeline_map["params_kept"].sum() + biases


def test_curves_priced_by_another_loss_model_are_refused_before_any_factorization(allocated):
    _, _, catalog, _ = allocated
    curves = catalog.load("svd.loss_curves")
    assert set(curves["loss_model"]) == {"own"}
    priced = typed_params(
        "compression",
        budget=BUDGET,
        allocation="global",
        curve_loss_model="kronecker",
        seed=0,
        device="cpu",
    )
    with pytest.raises(ValueError, match=r"priced by \['own'\].*rerun the svd\.loss_curves node"):
        allocate(curves, catalog.load("svd_reference_loss"), priced, solver="svd")


@pytest.mark.parametrize("solver", ["svd", "fwsvd", "svd_llm"])
def test_kronecker_priced_allocation_predicts_the_kronecker_loss_of_the_solvers_factors(
    allocated, solver
):
    """``curve_loss_model: kronecker`` (the default): the solver's own factors at the globally
    allocated ranks, and the rank map's predicted loss is their Kronecker-model loss."""
    bundle, fisher_information, catalog, _ = allocated
    priced = typed_params(
        "compression",
        budget=BUDGET,
        allocation="global",
        curve_loss_model="kronecker",
        seed=0,
        device="cpu",
    )
    statistics = catalog.load("calibration_statistics")
    curves = loss_curves(bundle, fisher_information, statistics, priced, {}, solver=solver)
    assert set(curves["loss_model"]) == {"kronecker"}
    rank_map = allocate(curves, catalog.load("svd_reference_loss"), priced, solver=solver)
    assert rank_map["curve"].str.endswith("priced by kronecker").all()
    compressed, report, _ = compress(
        bundle,
        fisher_information,
        statistics,
        catalog.load("svd_reference_loss"),
        rank_map,
        priced,
        {},
        solver=solver,
    )
    fisher, examples = fisher_information["tensors"], num_examples(fisher_information)
    for row in report.itertuples():
        recomputed = predicted_from_factors(
            "kfwsvd",  # the Kronecker model's formula, applied to this solver's factors
            bundle.model.get_submodule(row.module),
            compressed.model.get_submodule(row.module),
            fisher[f"{row.module}.weight"],
            statistics["tensors"],
            row.module,
            examples,
        )
        assert row.predicted_loss == pytest.approx(recomputed, rel=1e-4), (solver, row.module)
