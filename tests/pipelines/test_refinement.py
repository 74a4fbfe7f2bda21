"""Refinement: fine-tuning after compression on a tiny BERT, its own rows, and the registered
pipelines that switch it on (``refinement``, ``refined``) or leave it out (``__default__``)."""

from __future__ import annotations

import copy
import logging
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.config import OmegaConfigLoader
from kedro.framework.project import configure_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner
from kedro.validation import TypeExtractor

from tests.conftest import PROJECT_ROOT, make_tiny_bundle, toy_split, typed_params
from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.hf.training import TrainingOptions, train_classifier
from weighted_lowrank.kedro_glue.datasets import HFModelDataset
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY, fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import (
    CompressionParams,
    DataParams,
    EvaluationParams,
    ModelParams,
    RefinementParams,
)
from weighted_lowrank.lowrank.compression import compress_model
from weighted_lowrank.lowrank.layer import lowrank_modules
from weighted_lowrank.lowrank.serialization import load_compressed
from weighted_lowrank.lowrank.solvers import SOLVERS
from weighted_lowrank.pipelines.evaluation import create_pipeline as create_evaluation
from weighted_lowrank.pipelines.evaluation.nodes import score_examples
from weighted_lowrank.pipelines.refined.pipeline import DEFAULT_PACKAGES
from weighted_lowrank.pipelines.refinement import create_pipeline as create_refinement
from weighted_lowrank.pipelines.refinement.nodes import refine
from weighted_lowrank.pipelines.refinement.pipeline import create_refine_pipeline
from weighted_lowrank.pipelines.reporting.pipeline import (
    NAMESPACES,
    SUMMARY_NODES,
    create_child_run_pipeline,
)
from weighted_lowrank.settings import CONFIG_LOADER_ARGS

FINGERPRINT = "feedfacefeedface"
MODEL = typed_params("model", max_length=16)
EVALUATION = typed_params(
    "evaluation",
    batch_size=16,
    device="cpu",
    latency={"batch_size": 2, "sequence_length": 8, "repeats": 2, "warmup": 1, "threads": None},
)
REFINEMENT = typed_params(
    "refinement",
    trainable="all",
    epochs=2,
    batch_size=16,
    learning_rate=3e-3,
    warmup_ratio=0.0,
    progress=False,
)
TRAIN, VALIDATION, TEST = toy_split(96, seed=0), toy_split(32, seed=1), toy_split(48, seed=2)


@pytest.fixture(scope="module")
def compressed() -> tuple[ModelBundle, ModelBundle, pd.DataFrame]:
    """A tiny BERT fine-tuned on the toy task (a random one learns nothing once compressed),
    its SVD-compressed copy (both with one lineage) and the layer report evaluation reads."""
    dense = make_tiny_bundle(seed=1)
    options = TrainingOptions(
        epochs=3, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, max_length=16
    )
    train_classifier(
        dense.model, dense.tokenizer, toy_split(256, seed=3), VALIDATION, options, progress=False
    )
    model, results = compress_model(copy.deepcopy(dense.model), None, 0.3, "svd")
    report = pd.DataFrame(
        {
            "module": list(results),
            "rank": [result.rank for result in results.values()],
            "weighted_loss": [float(result.loss) for result in results.values()],
            "svd_loss": [float(result.loss) for result in results.values()],
            "total_seconds": 0.5,
            "shape": [f"{r.left.shape[0]}x{r.right.shape[1]}" for r in results.values()],
            "iterations": [result.iterations for result in results.values()],
            "stop_reason": [result.stop_reason for result in results.values()],
        }
    )
    dense = with_fingerprint(dense, FINGERPRINT)
    bundle = ModelBundle(model=model, tokenizer=dense.tokenizer, model_fingerprint=FINGERPRINT)
    return dense, bundle, with_fingerprint(report, FINGERPRINT)


class KeptDataset(MemoryDataset):
    """In memory, kept after its consumers ran (the runner releases intermediate datasets)."""

    def _release(self) -> None:
        pass


def fresh(bundle: ModelBundle) -> ModelBundle:
    return ModelBundle(copy.deepcopy(bundle.model), bundle.tokenizer, bundle.model_fingerprint)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_refine_trains_a_copy_and_leaves_the_compressed_model_untouched(compressed):
    _, bundle, _ = compressed
    before = state(bundle.model)
    refined, record = refine(bundle, TRAIN, VALIDATION, MODEL, REFINEMENT, 0, "cpu")
    assert same_state(before, state(bundle.model))
    assert all(parameter.requires_grad for parameter in bundle.model.parameters())
    assert refined.model is not bundle.model and not same_state(before, state(refined.model))
    assert refined.tokenizer is bundle.tokenizer
    assert refined.model_fingerprint == FINGERPRINT
    assert fingerprint_of(record) == FINGERPRINT
    assert set(record) == {FINGERPRINT_KEY, "refinement", "trainable", "options", "epochs"}
    assert record["refinement"] == REFINEMENT.describe() == "all, 2 epoch(s)"
    assert len(record["epochs"]) == 2


def test_refinement_is_the_fine_tuning_loop_with_the_same_options(compressed):
    _, bundle, _ = compressed
    refined, record = refine(fresh(bundle), TRAIN, VALIDATION, MODEL, REFINEMENT, 7, "cpu")
    reference = fresh(bundle)
    options = TrainingOptions(
        epochs=2, batch_size=16, learning_rate=3e-3, warmup_ratio=0.0, max_length=16, seed=7
    )
    history = train_classifier(
        reference.model, reference.tokenizer, TRAIN, VALIDATION, options, progress=False
    )
    assert same_state(state(reference.model), state(refined.model))
    assert [epoch["train_loss"] for epoch in record["epochs"]] == [
        epoch["train_loss"] for epoch in history
    ]
    assert record["epochs"][-1]["train_loss"] < record["epochs"][0]["train_loss"]
    assert record["options"]["seed"] == 7 and record["trainable"] == "all"


def test_factors_only_trains_the_low_rank_layers_and_unfreezes_afterwards(compressed):
    _, bundle, _ = compressed
    before = state(bundle.model)
    factors_only = REFINEMENT.model_copy(update={"trainable": "factors"})
    refined, record = refine(fresh(bundle), TRAIN, VALIDATION, MODEL, factors_only, 0, "cpu")
    prefixes = tuple(f"{name}." for name in lowrank_modules(refined.model))
    after = state(refined.model)
    changed = {key for key in after if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith(prefixes) for key in changed)
    assert any(key.endswith("left.weight") for key in changed)
    assert any(key.endswith("right.weight") for key in changed)
    assert all(parameter.requires_grad for parameter in refined.model.parameters())
    assert record["refinement"] == "factors, 2 epoch(s)"


def test_a_model_without_low_rank_layers_is_refused(compressed):
    dense, _, _ = compressed
    with pytest.raises(ValueError, match="no low-rank layers"):
        refine(dense, TRAIN, VALIDATION, MODEL, REFINEMENT, 0, "cpu")


def test_a_saved_refined_model_reloads_with_its_lineage(compressed, tmp_path):
    _, bundle, _ = compressed
    refined, _ = refine(fresh(bundle), TRAIN, VALIDATION, MODEL, REFINEMENT, 0, "cpu")
    dataset = HFModelDataset(str(tmp_path / "refined"), compressed=True)
    dataset.save(refined)
    assert dataset.load().model_fingerprint == FINGERPRINT
    reloaded = load_compressed(tmp_path / "refined")
    batch = refined.tokenizer(list(TEST["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = refined.model.eval()(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected)


def test_refine_nodes_read_each_solver_and_write_refined_rows():
    pipeline = create_refine_pipeline()
    assert {node.name for node in pipeline.nodes} == {f"refined.{s}.refine" for s in SOLVERS}
    assert pipeline.outputs() == {
        f"refined.{solver}.{name}"
        for solver in SOLVERS
        for name in ("compressed_model", "refinement_history")
    }
    assert {f"{solver}.compressed_model" for solver in SOLVERS} <= pipeline.inputs()


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def refined_run(compressed, tmp_path_factory):
    """The base rows' evaluation and child runs (as a default run leaves them), then the
    ``refinement`` pipeline;
    every solver namespace holds the same SVD-compressed model (the wiring is under test)."""
    dense, bundle, report = compressed
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(dense, copy_mode="assign"),
            "train_split": MemoryDataset(TRAIN),
            "validation_split": MemoryDataset(VALIDATION),
            "test_split": MemoryDataset(TEST),
            "params:model": MemoryDataset(MODEL),
            "params:evaluation": MemoryDataset(EVALUATION),
            "params:compression": MemoryDataset(typed_params("compression", budget=0.3)),
            "params:refinement": MemoryDataset(REFINEMENT),
            "params:reporting": MemoryDataset(typed_params("reporting")),
            "params:data": MemoryDataset(typed_params("data")),
            "params:seed": MemoryDataset(0),
            "params:device": MemoryDataset("cpu"),
        }
    )
    models = {}
    for solver in SOLVERS:
        # "assign": the nodes get this very object, so a node that changed it would show.
        models[solver] = fresh(bundle)
        catalog[f"{solver}.compressed_model"] = MemoryDataset(models[solver], copy_mode="assign")
        catalog[f"{solver}.layer_report"] = MemoryDataset(report)
        catalog[f"{solver}.rank_map"] = MemoryDataset(
            report[["module", "rank"]].assign(dense=False, predicted_loss=0.0)
        )
    for name in ("comparison_markdown", "accuracy_vs_params_plot"):
        catalog[name] = MemoryDataset(copy_mode="assign")
    # Persisted in a project run (JSON files, MLflow runs): kept here for the second run to read.
    for namespace in ("dense", *SOLVERS, *(f"refined.{solver}" for solver in SOLVERS)):
        catalog[f"{namespace}.evaluation_metrics"] = KeptDataset()
        catalog[f"{namespace}.predictions"] = KeptDataset()
        catalog[f"{namespace}.mlflow_run"] = MemoryDataset()
    catalog["comparison_table"] = KeptDataset()
    for solver in SOLVERS:
        for name in ("compressed_model", "refinement_history"):
            catalog[f"refined.{solver}.{name}"] = KeptDataset(copy_mode="assign")
    before = state(bundle.model)
    base_rows = sum(map(create_child_run_pipeline, NAMESPACES), create_evaluation())
    SequentialRunner().run(base_rows, catalog)
    SequentialRunner().run(create_refinement(), catalog)
    return catalog, models, before


def test_refinement_leaves_every_compressed_model_untouched(refined_run):
    _, models, before = refined_run
    for solver, bundle in models.items():
        assert same_state(before, state(bundle.model)), solver


def test_a_refined_row_has_exactly_the_metric_keys_of_a_base_row(refined_run):
    catalog, _, _ = refined_run
    dense = catalog.load("dense.evaluation_metrics")["metrics"]
    for solver in SOLVERS:
        base = catalog.load(f"{solver}.evaluation_metrics")
        refined = catalog.load(f"refined.{solver}.evaluation_metrics")
        assert set(refined) == set(base) == {FINGERPRINT_KEY, "metrics"}
        assert fingerprint_of(refined) == FINGERPRINT
        assert set(refined["metrics"]) == set(base["metrics"]) == set(dense), solver
        assert np.isfinite(list(refined["metrics"].values())).all()


def test_a_refined_row_scores_the_refined_model_with_its_solver_report(refined_run, compressed):
    catalog, _, _ = refined_run
    _, _, report = compressed
    refined_model = catalog.load("refined.svd.compressed_model")
    metrics = catalog.load("refined.svd.evaluation_metrics")["metrics"]
    base = catalog.load("svd.evaluation_metrics")["metrics"]
    by_hand = score_examples(refined_model, TEST, MODEL.max_length, EVALUATION)[0]
    for key, value in by_hand.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["test_loss"] < base["test_loss"]
    assert metrics["factorization_seconds"] == report["total_seconds"].iloc[0]
    for key in ("weighted_loss_rel_svd", "params_kept", "params_model", "size_on_disk_bytes"):
        assert metrics[key] == base[key], key
    history = catalog.load("refined.svd.refinement_history")
    assert fingerprint_of(history) == FINGERPRINT and len(history["epochs"]) == 2


def test_refined_child_runs_say_what_was_refined(refined_run):
    catalog, _, _ = refined_run
    base = catalog.load("svd.mlflow_run")  # recorded by the default run's reporting
    assert base["params"]["refinement"] == "off"
    for solver in SOLVERS:
        record = catalog.load(f"refined.{solver}.mlflow_run")
        assert record["params"]["solver"] == f"refined.{solver}"
        assert record["params"]["refinement"] == REFINEMENT.describe() == "all, 2 epoch(s)"
        assert set(record["params"]) == set(base["params"])
        assert set(record["metrics"]) == set(base["metrics"])


def test_the_comparison_is_rewritten_over_every_row(refined_run):
    catalog, _, _ = refined_run
    table = catalog.load("comparison_table")
    assert table["namespace"].tolist() == [
        "dense",
        *sorted(SOLVERS),
        *(f"refined.{solver}" for solver in sorted(SOLVERS)),
    ]
    assert not [column for column in table.columns if column.endswith("_refined")]
    assert "| refined.tfwsvd |" in catalog.load("comparison_markdown")


# ----------------------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def pipelines() -> dict[str, Pipeline]:
    configure_project("weighted_lowrank")
    from weighted_lowrank.pipeline_registry import register_pipelines

    return register_pipelines()


def producers(pipeline: Pipeline) -> Counter:
    return Counter(output for node in pipeline.nodes for output in node.outputs)


def test_the_default_run_has_no_refinement(pipelines):
    default = pipelines["__default__"]
    assert not [node.name for node in default.nodes if node.name.endswith(".refine")]
    datasets = default.all_inputs() | default.all_outputs()
    assert not [name for name in datasets if name.startswith("refined.")]
    assert "params:refinement" not in datasets
    assert not [node.name for node in default.nodes if node.name.startswith("risk_validation")]
    assert not set(pipelines["risk_validation"].nodes) & set(default.nodes)


def test_refined_is_the_default_run_plus_refinement_with_one_producer_per_dataset(pipelines):
    default, refinement = pipelines["__default__"], pipelines["refinement"]
    refined = pipelines["refined"]
    # Every node of the default run, as it is, except the comparison of the unrefined rows ...
    kept = [node for node in default.nodes if node.name not in SUMMARY_NODES]
    assert set(kept) <= set(refined.nodes)
    assert {node.name for node in default.nodes} <= {node.name for node in refined.nodes}
    # ... which refinement's comparison over every row replaces.
    assert set(refined.nodes) == set(kept) | set(refinement.nodes)
    comparison = refined.only_nodes("comparison_table").nodes[0]
    assert set(comparison.inputs) == {"paired_tests"} | {
        f"{name}.evaluation_metrics"
        for name in ("dense", *SOLVERS, *(f"refined.{solver}" for solver in SOLVERS))
    }
    # Kedro refuses two producers of one dataset when it builds a pipeline; build it again.
    Pipeline(refined.nodes)
    assert set(producers(refined).values()) == {1}
    assert not set(pipelines["risk_validation"].nodes) & set(refined.nodes)


def test_refinement_runs_on_what_a_default_run_persisted(pipelines):
    """``kedro run --pipelines refinement`` after a default run: every input is made by the
    default run and declared in the catalog (not a MemoryDataset that would be empty)."""
    default, refinement = pipelines["__default__"], pipelines["refinement"]
    inputs = {name for name in refinement.inputs() if not name.startswith("params:")}
    assert inputs <= default.all_outputs()
    assert not {node.name for node in default.nodes} - set(SUMMARY_NODES) & {
        node.name for node in refinement.nodes
    }
    loader = OmegaConfigLoader(
        str(PROJECT_ROOT / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": "base"}
    )
    catalog = DataCatalog.from_config(loader["catalog"])
    for name in sorted(inputs | refinement.outputs()):
        dataset = catalog.get(name)
        assert dataset is not None and not isinstance(dataset, MemoryDataset), name
    assert "refined/svd" in str(catalog.get("refined.svd.compressed_model")._filepath)


def test_kedro_builds_the_typed_blocks_the_nodes_name(pipelines, caplog):
    """In a run Kedro builds each ``params:<block>`` a node's signature annotates: one type per
    block across the whole run with refinement, and no node whose hints it cannot read."""
    with caplog.at_level(logging.WARNING, logger="kedro.validation.type_extractor"):
        types = TypeExtractor({"refined": pipelines["refined"]}).extract_types_from_pipelines()
    assert not [record.getMessage() for record in caplog.records]
    assert types["model"] is ModelParams and types["evaluation"] is EvaluationParams
    assert types["compression"] is CompressionParams and types["data"] is DataParams
    assert types["refinement"] is RefinementParams


def test_every_package_is_in_the_default_run_or_deliberately_optional(pipelines):
    packages = {
        path.name
        for path in (PROJECT_ROOT / "src" / "weighted_lowrank" / "pipelines").iterdir()
        if (path / "pipeline.py").is_file()
    }
    in_default = {package.__name__.rsplit(".", 1)[-1] for package in DEFAULT_PACKAGES}
    assert packages - in_default == {"refinement", "refined", "risk_validation"}
    assert set(pipelines) == packages | {"__default__"}
