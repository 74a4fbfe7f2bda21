"""compress_model and its parts: ranks from the budget, factorization, layer swap, SVD reference."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
import torch

from tests.conftest import logits_of, make_tiny_bundle, random_fisher
from tests.pipelines.conftest import make_calibration_statistics
from weighted_lowrank.lowrank.compression import (
    apply_factors,
    compress_model,
    factorize_model,
    layer_ranks,
    layer_seconds,
    svd_reference_losses,
)
from weighted_lowrank.lowrank.layer import lowrank_modules
from weighted_lowrank.lowrank.objective import FactorizationResult, rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.parallel import Parallel, parse_parallel
from weighted_lowrank.lowrank.solvers import SOLVERS, factorize, solver_options
from weighted_lowrank.lowrank.targets import select_linear_modules


def fast_options(solver: str) -> dict:
    return {"max_iters": 3} if "max_iters" in solver_options(solver) else {}


def test_svd_compression_is_the_truncated_svd_and_leaves_the_input_untouched(tiny_bundle):
    model = tiny_bundle.model
    before = {key: value.clone() for key, value in model.state_dict().items()}
    started = time.perf_counter()
    compressed, results = compress_model(model, None, 0.5, "svd")
    wall = time.perf_counter() - started
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    targets = select_linear_modules(model)
    replaced = lowrank_modules(compressed)
    assert list(replaced) == list(targets) == list(results)
    reference = svd_reference_losses(model, None, 0.5)
    for name, result in results.items():
        assert isinstance(result, FactorizationResult)
        dense = targets[name]
        layer = replaced[name]
        rank = rank_for_budget(tuple(dense.weight.shape), 0.5)
        assert layer.rank == result.rank == rank
        u, s, vh = torch.linalg.svd(dense.weight.double(), full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(layer.dense_weight().double(), best, atol=1e-5, rtol=1e-4)
        assert result.loss == pytest.approx(float(s[rank:].square().sum().detach()), rel=1e-4)
        assert result.loss == reference[name]
        assert (
            sum(p.numel() for p in layer.parameters())
            == rank * (dense.in_features + dense.out_features) + dense.out_features
            < dense.weight.numel() + dense.out_features
        )
        torch.testing.assert_close(layer.bias, dense.bias)
        assert [len(point) for point in result.history] == [2] * len(result.history)
    assert sum(layer_seconds(results).values()) <= wall + 1e-9
    assert not compressed.training and not any(m.training for m in replaced.values())


def test_results_are_the_factors_of_the_swapped_layers(tiny_bundle):
    fisher = random_fisher(tiny_bundle.model)
    compressed, results = compress_model(tiny_bundle.model, fisher, 0.4, "fwsvd")
    layers = lowrank_modules(compressed)
    assert list(layers) == list(results)
    for name, result in results.items():
        torch.testing.assert_close(layers[name].dense_weight(), result.left @ result.right)
        assert layers[name].rank == result.rank and result.solver == "fwsvd"


def test_losses_use_the_given_importance(tiny_bundle):
    fisher = random_fisher(tiny_bundle.model)
    compressed, results = compress_model(tiny_bundle.model, fisher, 0.4, "svd")
    layers = lowrank_modules(compressed)
    targets = select_linear_modules(tiny_bundle.model)
    reference = svd_reference_losses(tiny_bundle.model, fisher, 0.4)
    for name, result in results.items():
        layer = layers[name]
        expected = weighted_loss(
            targets[name].weight, fisher[f"{name}.weight"], layer.left.weight, layer.right.weight
        )
        assert result.loss == pytest.approx(expected, rel=1e-4)
        assert reference[name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_reference_is_factorize_svd_per_layer(tiny_bundle, dtype):
    model = tiny_bundle.model.to(dtype)
    fisher = random_fisher(model)
    reference = svd_reference_losses(model, fisher, 0.4)
    targets = select_linear_modules(model)
    assert list(reference) == list(targets)
    for name, module in targets.items():
        rank = rank_for_budget(tuple(module.weight.shape), 0.4)
        expected = factorize(
            module.weight.detach(), fisher[f"{name}.weight"].to(dtype), rank, solver="svd"
        )
        assert reference[name] == expected.loss, name
    only = svd_reference_losses(model, fisher, 0.4, targets=r"layer\.0\.attention\.self\.query$")
    assert list(only) == ["bert.encoder.layer.0.attention.self.query"]


def test_exactly_low_rank_weights_are_reproduced():
    bundle = make_tiny_bundle()
    model = bundle.model
    with torch.no_grad():
        for module in select_linear_modules(model).values():
            u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
            module.weight.copy_((u[:, :4] * s[:4]) @ vh[:4])
    dense_logits = logits_of(model, bundle.tokenizer)
    compressed, results = compress_model(model, None, 0.3, "svd")
    assert min(result.rank for result in results.values()) >= 4
    torch.testing.assert_close(
        logits_of(compressed, bundle.tokenizer), dense_logits, atol=1e-5, rtol=1e-4
    )


def test_factorize_then_apply_is_compress_model(tiny_bundle):
    fisher = random_fisher(tiny_bundle.model)
    results = factorize_model(tiny_bundle.model, fisher, 0.5, "svd")
    assert lowrank_modules(tiny_bundle.model) == {}
    compressed = apply_factors(tiny_bundle.model, results)
    again, _ = compress_model(tiny_bundle.model, fisher, 0.5, "svd")
    torch.testing.assert_close(
        logits_of(compressed, tiny_bundle.tokenizer), logits_of(again, tiny_bundle.tokenizer)
    )
    name, result = next(iter(results.items()))
    wrong = {name: dataclasses.replace(result, left=result.left[:-1])}
    with pytest.raises(ValueError, match=f"factors .* for layer '{name}'"):
        apply_factors(tiny_bundle.model, wrong)


def test_layer_seconds_share_the_batch_time_of_equal_shapes(tiny_bundle):
    results = factorize_model(tiny_bundle.model, None, 0.5, "svd")
    shares = layer_seconds(results)
    groups: dict[tuple, list[str]] = {}
    for name, result in results.items():
        groups.setdefault((tuple(result.left.shape), tuple(result.right.shape)), []).append(name)
    assert len(groups) < len(results)  # the tiny BERT has layers of equal shape
    for names in groups.values():
        assert len({results[name].seconds for name in names}) == 1
        for name in names:
            assert shares[name] == pytest.approx(results[name].seconds / len(names))


def test_layer_ranks_follow_the_budget_and_name_the_layer_that_cannot_shrink():
    assert layer_ranks({"a": (32, 128), "b": (32, 32)}, 0.5) == {"a": 12, "b": 8}
    with pytest.raises(ValueError, match=r"rank 0 for layer 'b' \(32x32\).*at least 0\.0625"):
        layer_ranks({"a": (32, 128), "b": (32, 32)}, 0.05)
    with pytest.raises(ValueError, match=r"rank 1 for layer 'c' \(2x2\) keeps 4 parameters"):
        layer_ranks({"c": (2, 2)}, 1.0)


@pytest.mark.parametrize("budget", [0, 1, 1.5, -0.2, True, "0.5"])
def test_budget_outside_the_open_unit_interval_is_rejected(tiny_bundle, budget):
    with pytest.raises(ValueError, match="budget"):
        compress_model(tiny_bundle.model, None, budget, "svd")


def test_budget_that_leaves_no_rank_names_the_layer(tiny_bundle):
    with pytest.raises(
        ValueError, match=r"rank 0 for layer 'bert\.encoder\.layer\.0\.attention\.self\.query'"
    ):
        compress_model(tiny_bundle.model, None, 0.01, "svd")


def test_bad_solver_and_fisher_are_rejected(tiny_bundle):
    model = tiny_bundle.model
    with pytest.raises(ValueError, match="solver 'nope'"):
        compress_model(model, None, 0.5, "nope")
    fisher = random_fisher(model)
    del fisher["bert.encoder.layer.1.intermediate.dense.weight"]
    with pytest.raises(ValueError, match="intermediate.dense.weight"):
        compress_model(model, fisher, 0.5, "svd")
    with pytest.raises(ValueError, match="intermediate.dense.weight"):
        svd_reference_losses(model, fisher, 0.5)
    fisher = random_fisher(model)
    fisher["bert.encoder.layer.0.output.dense.weight"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match="shape"):
        compress_model(model, fisher, 0.5, "svd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_solvers_match_cpu_and_factors_follow_the_model(tiny_bundle):
    fisher = random_fisher(tiny_bundle.model)
    statistics = make_calibration_statistics(tiny_bundle.model)["tensors"]
    for solver in SOLVERS:
        options = {"statistics": statistics, **fast_options(solver)}
        _, on_cpu = compress_model(tiny_bundle.model, fisher, 0.5, solver, **options)
        on_cuda_model, on_cuda = compress_model(
            tiny_bundle.model, fisher, 0.5, solver, device="cuda", **options
        )
        assert all(p.device.type == "cpu" for p in on_cuda_model.parameters()), solver
        for name, cpu_result in on_cpu.items():
            assert on_cuda[name].rank == cpu_result.rank
            assert on_cuda[name].loss == pytest.approx(cpu_result.loss, rel=1e-2), solver
    cpu_reference = svd_reference_losses(tiny_bundle.model, fisher, 0.5)
    cuda_reference = svd_reference_losses(tiny_bundle.model, fisher, 0.5, device="cuda")
    assert cuda_reference == pytest.approx(cpu_reference, rel=1e-4)
    model = tiny_bundle.model.to("cuda")
    compressed, _ = compress_model(model, fisher, 0.5, "svd")
    assert all(p.device.type == "cuda" for p in compressed.parameters())


def test_parallel_forms_and_their_errors():
    assert parse_parallel("serial") == Parallel(map, 1)
    assert parse_parallel("threads") == Parallel(map, torch.get_num_threads())
    assert parse_parallel("threads:3") == Parallel(map, 3)
    assert parse_parallel("tcp://127.0.0.1:8786").threads == 1
    for bad in ("fast", "threads:0", "threads:two", "", None, 2):
        with pytest.raises(ValueError, match=rf"parallel {re.escape(repr(bad))} is not one of"):
            parse_parallel(bad)


def test_worker_threads_give_the_serial_result_up_to_rounding(tiny_bundle):
    # compression.parallel: threads:2 — two workers share tfwsvd's chunks; only sums over chunks
    # round differently, so the iterations agree and the losses to float32 rounding.
    fisher = random_fisher(tiny_bundle.model)
    serial = factorize_model(tiny_bundle.model, fisher, 0.5, "tfwsvd", max_iters=20, tol=0.0)
    threaded = factorize_model(
        tiny_bundle.model,
        fisher,
        0.5,
        "tfwsvd",
        max_iters=20,
        tol=0.0,
        **vars(parse_parallel("threads:2")),
    )
    for name, result in serial.items():
        assert threaded[name].iterations == result.iterations
        assert threaded[name].loss == pytest.approx(result.loss, rel=1e-6)  # float32 weights
