"""Saved versions that cannot be used fail naming the catalog entry, the version directory and
the ``--load-versions`` of the previous complete version, and change nothing on disk: truncated
or missing model files, a damaged tensor file, a rank map that is not the compressed model's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog
from kedro.io.core import DatasetError
from kedro.pipeline import Node, Pipeline
from kedro.runner import SequentialRunner

from tests.conftest import make_tiny_bundle
from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.kedro_glue.datasets.integrity import UnloadableVersionError
from weighted_lowrank.kedro_glue.hooks import SavedVersionChecks
from weighted_lowrank.lowrank.layer import LowRankLinear, replace_module

LAYER = "bert.encoder.layer.0.intermediate.dense"


def _entry(name: str, path: Path, kind: str, **extra) -> dict:
    types = {
        "model": "weighted_lowrank.kedro_glue.datasets.HFModelDataset",
        "tensors": "weighted_lowrank.kedro_glue.datasets.SafetensorsDataset",
        "table": "pandas.ParquetDataset",
    }
    return {name: {"type": types[kind], "filepath": str(path), "versioned": True, **extra}}


def _run_version(run: int) -> str:
    """The save version of the ``run``-th `kedro run` (one version per run, as a session has)."""
    return f"2026-01-0{run + 1}T00.00.00.000Z"


def _save_versions(config: dict, name: str, values: list) -> tuple[DataCatalog, list[str]]:
    """One catalog per save, as one `kedro run` per version; returns a fresh catalog and the
    versions, oldest first."""
    for run, value in enumerate(values):
        DataCatalog.from_config(config, save_version=_run_version(run)).save(name, value)
    catalog = DataCatalog.from_config(config)
    return catalog, sorted(catalog[name].list_versions(full_path=False))


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _version_dir(root: Path, version: str) -> Path:
    return root / version / root.name


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _check_before_load(catalog: DataCatalog, name: str) -> None:
    """What a run does before it loads ``name``: the hook's check, with the entry's name."""
    checks = SavedVersionChecks()
    checks.before_pipeline_run(run_params={}, pipeline=None, catalog=catalog)
    checks.before_dataset_loaded(dataset_name=name, node=None)


def _compressed(seed: int, rank: int) -> ModelBundle:
    bundle = make_tiny_bundle(seed=seed)
    dense = bundle.model.get_submodule(LAYER)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    factors = LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank], dense.bias.detach())
    replace_module(bundle.model, LAYER, factors)
    return bundle


@pytest.mark.parametrize("compressed", [False, True], ids=["fine_tuned", "compressed"])
def test_truncated_weights_name_entry_version_and_the_previous_complete_version(
    tmp_path, compressed
):
    root = tmp_path / "model"
    config = _entry("fine_tuned_model", root, "model", compressed=compressed)
    bundles = [
        _compressed(seed, 4) if compressed else make_tiny_bundle(seed=seed) for seed in (0, 1)
    ]
    for seed, bundle in enumerate(bundles):
        bundle.model_fingerprint = f"fp{seed}"
    catalog, (older, newer) = _save_versions(config, "fine_tuned_model", bundles)
    _truncate(_version_dir(root, newer) / "model.safetensors")
    before = _snapshot(tmp_path)

    with pytest.raises(UnloadableVersionError) as raised:
        _check_before_load(catalog, "fine_tuned_model")
    message = str(raised.value)
    assert "catalog entry 'fine_tuned_model'" in message
    assert f"version {newer} ({_version_dir(root, newer)})" in message
    assert "model.safetensors is truncated" in message
    assert f"--load-versions=fine_tuned_model:{older}" in message
    # Loading through the catalog (a notebook) fails the same way, the entry as Kedro's prefix.
    with pytest.raises(DatasetError, match=rf"^fine_tuned_model: .*{newer}.*:{older}"):
        catalog.load("fine_tuned_model")
    assert _snapshot(tmp_path) == before, "nothing on disk is modified"
    # The version the message names loads; the lineage check never offers the broken one.
    assert isinstance(catalog.load("fine_tuned_model", version=older), ModelBundle)
    dataset = catalog["fine_tuned_model"]
    assert dataset.fingerprint_at(older) == "fp0" and dataset.fingerprint_at(newer) is None


def test_a_missing_config_json_with_no_complete_older_version_says_to_rerun(tmp_path):
    root = tmp_path / "model"
    config = _entry("fine_tuned_model", root, "model")
    catalog, (only,) = _save_versions(config, "fine_tuned_model", [make_tiny_bundle()])
    (_version_dir(root, only) / "config.json").unlink()
    before = _snapshot(tmp_path)

    with pytest.raises(UnloadableVersionError) as raised:
        _check_before_load(catalog, "fine_tuned_model")
    message = str(raised.value)
    assert f"version {only}" in message and "config.json is missing" in message
    assert "no older version has complete files" in message
    assert "--to-outputs=fine_tuned_model" in message
    assert _snapshot(tmp_path) == before


def test_the_previous_complete_version_skips_older_broken_ones(tmp_path):
    root = tmp_path / "model"
    config = _entry("m", root, "model")
    catalog, (oldest, middle, newest) = _save_versions(
        config, "m", [make_tiny_bundle(seed=seed) for seed in range(3)]
    )
    (_version_dir(root, newest) / "config.json").unlink()
    _truncate(_version_dir(root, middle) / "model.safetensors", keep=0.99)
    with pytest.raises(UnloadableVersionError, match=rf"--load-versions=m:{oldest}"):
        _check_before_load(catalog, "m")


def test_the_runner_checks_an_entry_before_loading_it(tmp_path):
    """In a run, the hook fires where the runner loads a node's input (before_dataset_loaded)."""
    root = tmp_path / "model"
    config = _entry("fine_tuned_model", root, "model")
    catalog, (older, newer) = _save_versions(
        config, "fine_tuned_model", [make_tiny_bundle(seed=0), make_tiny_bundle(seed=1)]
    )
    _truncate(_version_dir(root, newer) / "model.safetensors")
    checks = SavedVersionChecks()
    hooks = _create_hook_manager()
    hooks.register(checks)
    checks.before_pipeline_run(run_params={}, pipeline=None, catalog=catalog)
    pipeline = Pipeline([Node(lambda bundle: None, "fine_tuned_model", None, name="use")])
    with pytest.raises(UnloadableVersionError, match=rf"fine_tuned_model:{older}"):
        SequentialRunner().run(pipeline, catalog, hooks)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda path: _truncate(path), "is truncated"),
        (lambda path: path.write_bytes(b"\xff" * 64), "is truncated or not a safetensors file"),
        (
            lambda path: path.write_bytes((4).to_bytes(8, "little") + b"nope" + b"\0" * 8),
            "unreadable safetensors header",
        ),
        (lambda path: path.write_bytes(path.read_bytes() + b"\0" * 3), "3 bytes beyond"),
    ],
    ids=["truncated", "garbage", "bad-header", "trailing-bytes"],
)
def test_a_damaged_tensor_file_names_entry_version_and_previous(tmp_path, damage, problem):
    path = tmp_path / "fisher_information.safetensors"
    config = _entry("fisher_information", path, "tensors")
    values = [{"tensors": {"w": torch.full((64, 8), float(i))}, "metadata": {}} for i in (0, 1)]
    catalog, (older, newer) = _save_versions(config, "fisher_information", values)
    damage(_version_dir(path, newer))
    before = _snapshot(tmp_path)

    with pytest.raises(UnloadableVersionError) as raised:
        _check_before_load(catalog, "fisher_information")
    message = str(raised.value)
    assert "catalog entry 'fisher_information'" in message and problem in message
    assert f"version {newer}" in message
    assert f"--load-versions=fisher_information:{older}" in message
    with pytest.raises(DatasetError, match=rf"^fisher_information: .*{older}"):
        catalog.load("fisher_information")
    assert _snapshot(tmp_path) == before
    assert torch.equal(
        catalog.load("fisher_information", version=older)["tensors"]["w"], torch.zeros(64, 8)
    )


def test_complete_versions_pass_the_check_and_load(tmp_path):
    root = tmp_path / "model"
    config = {
        **_entry("m", root, "model", compressed=True),
        **_entry("t", tmp_path / "t.safetensors", "tensors"),
    }
    catalog, _ = _save_versions(config, "m", [_compressed(0, 4)])
    catalog.save("t", {"tensors": {"w": torch.ones(2)}, "metadata": {"k": "v"}})
    _check_before_load(catalog, "m")
    _check_before_load(catalog, "t")
    _check_before_load(catalog, "not_in_the_catalog")
    assert catalog["m"].lowrank_ranks_at(catalog["m"].list_versions(full_path=False)[0]) == {
        LAYER: 4
    }


def _rank_map(rank: int) -> pd.DataFrame:
    return pd.DataFrame({"module": [LAYER], "rank": [rank], "dense": [False]})


def test_a_rank_map_that_is_not_the_models_names_both_entries_and_a_matching_pair(tmp_path):
    config = {
        **_entry("svd.compressed_model", tmp_path / "compressed", "model", compressed=True),
        **_entry("svd.rank_map", tmp_path / "rank_map.parquet", "table"),
    }
    # Run 1 saves rank 4 with its model; run 2 saves rank 6 with its model.
    for run, rank in enumerate((4, 6)):
        outputs = DataCatalog.from_config(config, save_version=_run_version(run))
        outputs.save("svd.compressed_model", _compressed(0, rank))
        outputs.save("svd.rank_map", _rank_map(rank))
    catalog = DataCatalog.from_config(config)
    first, second = _run_version(0), _run_version(1)
    # The newest model evaluated against the older rank map (e.g. a pinned rank map).
    model = catalog.load("svd.compressed_model")
    rank_map = catalog.load("svd.rank_map", version=first)
    pinned = DataCatalog.from_config(config, load_versions={"svd.rank_map": first})
    node = Node(
        lambda *args: None, ["svd.compressed_model", "svd.rank_map"], None, name="svd.evaluate"
    )

    with pytest.raises(ValueError) as raised:
        SavedVersionChecks().before_node_run(
            node=node,
            catalog=pinned,
            inputs={"svd.compressed_model": model, "svd.rank_map": rank_map},
        )
    message = str(raised.value)
    assert "node 'svd.evaluate'" in message
    assert f"svd.compressed_model (version {second})" in message
    assert f"svd.rank_map (version {first})" in message
    assert f"--load-versions=svd.rank_map:{second} (the rank map of this model)" in message
    assert f"--load-versions=svd.compressed_model:{first} (the model of this rank map)" in message
    # A matching pair passes.
    SavedVersionChecks().before_node_run(
        node=node,
        catalog=catalog,
        inputs={"svd.compressed_model": model, "svd.rank_map": catalog.load("svd.rank_map")},
    )


def test_a_rank_map_matching_no_saved_version_says_to_remake_both(tmp_path):
    catalog = DataCatalog.from_config(
        _entry("svd.compressed_model", tmp_path / "compressed", "model", compressed=True)
    )
    catalog.save("svd.compressed_model", _compressed(0, 4))
    node = Node(lambda *args: None, ["svd.compressed_model", "svd.rank_map"], None, name="e")
    with pytest.raises(ValueError, match=r"--to-outputs=svd\.compressed_model,svd\.rank_map"):
        SavedVersionChecks().before_node_run(
            node=node,
            catalog=catalog,
            inputs={
                "svd.compressed_model": catalog.load("svd.compressed_model"),
                "svd.rank_map": _rank_map(3),
            },
        )


def test_a_version_the_loader_rejects_names_the_error_and_the_previous_version(tmp_path):
    """Files that pass the header checks but that transformers cannot read (a config.json that
    is JSON but no model config) fail as unloadable too, with the loader's own message."""
    root = tmp_path / "model"
    config = _entry("fine_tuned_model", root, "model")
    catalog, (older, newer) = _save_versions(
        config, "fine_tuned_model", [make_tiny_bundle(seed=0), make_tiny_bundle(seed=1)]
    )
    (_version_dir(root, newer) / "config.json").write_text("{}")
    _check_before_load(catalog, "fine_tuned_model")  # complete files: the check passes
    with pytest.raises(DatasetError, match=rf"loading it failed with .*:{older}"):
        catalog.load("fine_tuned_model")
