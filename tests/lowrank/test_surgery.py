"""Model surgery: LowRankLinear, compress_model, save/load of compressed models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertForSequenceClassification

from tests.conftest import make_tiny_bundle
from weighted_lowrank.lowrank.objective import rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.surgery import (
    LOWRANK_CONFIG_FILE,
    WEIGHTS_FILE,
    LowRankLinear,
    compress_model,
    load_compressed,
    lowrank_modules,
    parameter_counts,
    save_compressed,
    serialized_size_bytes,
)
from weighted_lowrank.lowrank.targets import select_linear_modules

TEXTS = ["good great fine film", "a terrible dull movie", "the plot was awful", "wonderful acting"]


def logits_of(bundle_model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return bundle_model(**batch).logits


def random_fisher(model, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{name}.weight": torch.rand(module.weight.shape, generator=generator) + 0.05
        for name, module in select_linear_modules(model).items()
    }


def test_lowrank_linear_equals_its_dense_product():
    generator = torch.Generator().manual_seed(0)
    left, right, bias = (
        torch.randn(shape, generator=generator) for shape in [(7, 3), (3, 5), (7,)]
    )
    layer = LowRankLinear.from_factors(left, right, bias)
    inputs = torch.randn(2, 4, 5, generator=generator)
    expected = inputs @ (left @ right).T + bias
    torch.testing.assert_close(layer(inputs), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), left @ right)
    assert (layer.in_features, layer.out_features, layer.rank) == (5, 7, 3)
    assert not hasattr(layer, "weight")
    assert layer.bias is layer.left.bias
    assert sum(p.numel() for p in layer.parameters()) == 3 * (5 + 7) + 7
    assert set(layer.state_dict()) == {"right.weight", "left.weight", "left.bias"}
    no_bias = LowRankLinear.from_factors(left, right)
    torch.testing.assert_close(no_bias(inputs), inputs @ (left @ right).T, atol=1e-6, rtol=1e-5)


def test_lowrank_linear_rejects_bad_shapes():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, 0)
    with pytest.raises(ValueError, match="factors"):
        LowRankLinear.from_factors(torch.zeros(4, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bias"):
        LowRankLinear.from_factors(torch.zeros(4, 2), torch.zeros(2, 4), torch.zeros(3))


def test_svd_compression_is_the_truncated_svd_and_leaves_the_input_untouched(tiny_bundle):
    model = tiny_bundle.model
    before = {key: value.clone() for key, value in model.state_dict().items()}
    compressed, report = compress_model(model, None, 0.5, "svd")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    targets = select_linear_modules(model)
    replaced = lowrank_modules(compressed)
    assert list(replaced) == list(targets) == [row["module"] for row in report]
    for row in report:
        dense = targets[row["module"]]
        layer = replaced[row["module"]]
        rank = rank_for_budget(tuple(dense.weight.shape), 0.5)
        assert layer.rank == row["rank"] == rank
        u, s, vh = torch.linalg.svd(dense.weight.double(), full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(layer.dense_weight().double(), best, atol=1e-5, rtol=1e-4)
        assert row["weighted_loss"] == pytest.approx(
            float(s[rank:].square().sum().detach()), rel=1e-4
        )
        assert row["loss_rel_svd"] == pytest.approx(1.0)
        assert (
            row["params_after"]
            == rank * (dense.in_features + dense.out_features) + dense.out_features
        )
        assert (
            row["params_after"] < row["params_before"] == dense.weight.numel() + dense.out_features
        )
        torch.testing.assert_close(layer.bias, dense.bias)
        assert [len(point) for point in json.loads(row["history"])] == [2] * len(
            json.loads(row["history"])
        )
    assert sum(row["seconds"] for row in report) <= report[0]["total_seconds"] + 1e-9
    assert not compressed.training and not any(m.training for m in replaced.values())


def test_report_uses_the_given_importance(tiny_bundle):
    fisher = random_fisher(tiny_bundle.model)
    compressed, report = compress_model(tiny_bundle.model, fisher, 0.4, "svd")
    layers = lowrank_modules(compressed)
    targets = select_linear_modules(tiny_bundle.model)
    for row in report:
        name = row["module"]
        layer = layers[name]
        expected = weighted_loss(
            targets[name].weight, fisher[f"{name}.weight"], layer.left.weight, layer.right.weight
        )
        assert row["weighted_loss"] == pytest.approx(expected, rel=1e-4)
        assert row["svd_loss"] == pytest.approx(expected, rel=1e-4)


def test_exactly_low_rank_weights_are_reproduced():
    bundle = make_tiny_bundle()
    model = bundle.model
    with torch.no_grad():
        for module in select_linear_modules(model).values():
            u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
            module.weight.copy_((u[:, :4] * s[:4]) @ vh[:4])
    dense_logits = logits_of(model, bundle.tokenizer)
    compressed, report = compress_model(model, None, 0.3, "svd")
    assert min(row["rank"] for row in report) >= 4
    torch.testing.assert_close(
        logits_of(compressed, bundle.tokenizer), dense_logits, atol=1e-5, rtol=1e-4
    )


def test_round_trip_gives_equal_logits_and_clear_keys(tmp_path, tiny_bundle):
    fisher = random_fisher(tiny_bundle.model)
    compressed, report = compress_model(tiny_bundle.model, fisher, 0.5, "svd")
    save_compressed(compressed, tmp_path, tiny_bundle.tokenizer)
    reloaded = load_compressed(tmp_path)
    assert type(reloaded) is BertForSequenceClassification
    assert {name: m.rank for name, m in lowrank_modules(reloaded).items()} == {
        row["module"]: row["rank"] for row in report
    }
    torch.testing.assert_close(
        logits_of(reloaded, tiny_bundle.tokenizer),
        logits_of(compressed, tiny_bundle.tokenizer),
        atol=1e-5,
        rtol=0,
    )
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    query = "bert.encoder.layer.0.attention.self.query"
    assert saved[f"{query}.right.weight"].shape == (report[0]["rank"], 32)
    assert saved[f"{query}.left.weight"].shape == (32, report[0]["rank"])
    assert f"{query}.left.bias" in saved and f"{query}.weight" not in saved
    rank_map = json.loads((tmp_path / LOWRANK_CONFIG_FILE).read_text())["modules"]
    assert {name: spec["rank"] for name, spec in rank_map.items()} == {
        row["module"]: row["rank"] for row in report
    }
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer(TEXTS[0])["input_ids"] == tiny_bundle.tokenizer(TEXTS[0])["input_ids"]


def test_parameter_accounting_from_saved_tensors(tmp_path, tiny_bundle):
    dense = tiny_bundle.model
    compressed, report = compress_model(dense, None, 0.25, "svd")
    save_compressed(compressed, tmp_path / "compressed")
    save_compressed(dense, tmp_path / "dense")
    modules = [row["module"] for row in report]
    saved = parameter_counts(load_file(str(tmp_path / "compressed" / WEIGHTS_FILE)), modules)
    saved_dense = parameter_counts(load_file(str(tmp_path / "dense" / WEIGHTS_FILE)), modules)
    assert saved["layers"] == sum(row["params_after"] for row in report)
    assert saved_dense["layers"] == sum(row["params_before"] for row in report)
    assert saved_dense["model"] == sum(p.numel() for p in dense.parameters())
    assert saved["model"] == saved_dense["model"] - saved_dense["layers"] + saved["layers"]
    for name, directory in (("compressed", compressed), ("dense", dense)):
        assert serialized_size_bytes(directory) == (tmp_path / name / WEIGHTS_FILE).stat().st_size
    assert (tmp_path / "compressed" / WEIGHTS_FILE).stat().st_size < (
        tmp_path / "dense" / WEIGHTS_FILE
    ).stat().st_size


def test_dtype_survives_the_round_trip(tmp_path, tiny_bundle):
    model = tiny_bundle.model.to(torch.float64)
    compressed, _ = compress_model(model, None, 0.5, "svd")
    assert (
        lowrank_modules(compressed)["bert.encoder.layer.1.output.dense"].left.weight.dtype
        == torch.float64
    )
    save_compressed(compressed, tmp_path)
    reloaded = load_compressed(tmp_path)
    assert all(p.dtype == torch.float64 for p in reloaded.parameters())
    torch.testing.assert_close(
        logits_of(reloaded, tiny_bundle.tokenizer),
        logits_of(compressed, tiny_bundle.tokenizer),
        atol=1e-12,
        rtol=0,
    )


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
    fisher = random_fisher(model)
    fisher["bert.encoder.layer.0.output.dense.weight"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match="shape"):
        compress_model(model, fisher, 0.5, "svd")


def test_load_is_strict_about_tensor_keys(tmp_path, tiny_bundle):
    compressed, _ = compress_model(tiny_bundle.model, None, 0.5, "svd")
    save_compressed(compressed, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    save_file({**tensors, "extra.weight": torch.zeros(1)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="unexpected keys \\['extra.weight'\\]"):
        load_compressed(tmp_path)
    del tensors["bert.encoder.layer.0.attention.self.key.left.weight"]
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(
        ValueError, match="missing keys \\['bert.encoder.layer.0.attention.self.key.left.weight'\\]"
    ):
        load_compressed(tmp_path)


def test_load_rejects_an_inconsistent_rank_map(tmp_path, tiny_bundle):
    compressed, _ = compress_model(tiny_bundle.model, None, 0.5, "svd")
    save_compressed(compressed, tmp_path)
    path = tmp_path / LOWRANK_CONFIG_FILE
    config = json.loads(path.read_text())
    config["modules"]["bert.encoder.layer.0.attention.self.query"]["rank"] += 1
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError):
        load_compressed(tmp_path)
    config["modules"]["bert.encoder.layer.0.attention.self.query"]["out_features"] = 5
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not replace an nn.Linear"):
        load_compressed(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match=LOWRANK_CONFIG_FILE):
        load_compressed(tmp_path)


def test_save_rejects_a_model_transformers_cannot_rebuild(tmp_path):
    with pytest.raises(ValueError, match="PreTrainedModel"):
        save_compressed(nn.Linear(2, 2), tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_solvers_match_cpu_and_factors_follow_the_model(tmp_path, tiny_bundle):
    from weighted_lowrank.lowrank.solvers import SOLVERS, solver_options

    fisher = random_fisher(tiny_bundle.model)
    for solver in SOLVERS:
        options = {"max_iters": 3} if "max_iters" in solver_options(solver) else {}
        on_cpu, cpu_report = compress_model(tiny_bundle.model, fisher, 0.5, solver, **options)
        on_cuda, cuda_report = compress_model(
            tiny_bundle.model, fisher, 0.5, solver, device="cuda", **options
        )
        assert all(p.device.type == "cpu" for p in on_cuda.parameters()), solver
        for cpu_row, cuda_row in zip(cpu_report, cuda_report, strict=True):
            assert cuda_row["rank"] == cpu_row["rank"]
            assert cuda_row["weighted_loss"] == pytest.approx(cpu_row["weighted_loss"], rel=1e-2), (
                solver
            )
    model = tiny_bundle.model.to("cuda")
    compressed, _ = compress_model(model, fisher, 0.5, "svd")
    assert all(p.device.type == "cuda" for p in compressed.parameters())
    save_compressed(compressed, tmp_path, tiny_bundle.tokenizer)
    reloaded = load_compressed(tmp_path, device="cuda")
    batch = tiny_bundle.tokenizer(TEXTS, return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, compressed(**batch).logits, atol=1e-5, rtol=0
        )
