"""HFModelDataset: round trip, versioning, atomic saves and error messages."""

from __future__ import annotations

import pytest
import torch
from kedro.io import DataCatalog
from kedro.io.core import DatasetError, Version

from tests.conftest import make_tiny_bundle
from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.kedro_glue.datasets import HFModelDataset

SENTENCES = ["a wonderful lovely movie", "awful acting and bad story", "the plot"]


def _logits(bundle: ModelBundle) -> torch.Tensor:
    encoded = bundle.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    bundle.model.eval()
    with torch.no_grad():
        return bundle.model(**encoded).logits


def test_round_trip_gives_identical_logits_and_tokenization(tmp_path):
    bundle = make_tiny_bundle(num_labels=3, seed=1)
    dataset = HFModelDataset(filepath=str(tmp_path / "model"))
    dataset.save(bundle)
    loaded = dataset.load()

    assert isinstance(loaded, ModelBundle)
    assert not loaded.model.training
    assert loaded.model.config.num_labels == 3
    assert torch.equal(_logits(loaded), _logits(bundle))
    assert loaded.tokenizer(SENTENCES)["input_ids"] == bundle.tokenizer(SENTENCES)["input_ids"]
    files = {path.name for path in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)


def test_unversioned_save_replaces_the_previous_model(tmp_path):
    dataset = HFModelDataset(filepath=str(tmp_path / "model"))
    dataset.save(make_tiny_bundle(seed=0))
    newer = make_tiny_bundle(seed=1)
    dataset.save(newer)
    assert torch.equal(_logits(dataset.load()), _logits(newer))
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def _catalog(path) -> DataCatalog:
    """A fresh catalog per run, as `kedro run` builds one (one save version per run)."""
    config = {"type": "weighted_lowrank.kedro_glue.datasets.HFModelDataset", "filepath": str(path)}
    return DataCatalog.from_config({"model": {**config, "versioned": True}})


def test_two_saves_make_two_versions_latest_loads_and_pinned_loads_older(tmp_path):
    older, newer = make_tiny_bundle(seed=0), make_tiny_bundle(seed=1)
    assert not torch.equal(_logits(older), _logits(newer))
    _catalog(tmp_path / "model").save("model", older)
    catalog = _catalog(tmp_path / "model")
    catalog.save("model", newer)

    dataset = catalog["model"]
    versions = dataset.list_versions(full_path=False)
    assert len(versions) == 2 and versions == sorted(versions, reverse=True)
    assert torch.equal(_logits(catalog.load("model")), _logits(newer))

    pinned = HFModelDataset(str(tmp_path / "model"), version=Version(versions[1], None))
    assert torch.equal(_logits(pinned.load()), _logits(older))
    assert (tmp_path / "model" / versions[0] / "model" / "model.safetensors").is_file()


def test_failed_save_leaves_no_visible_version_and_no_staging_directory(tmp_path, monkeypatch):
    bundle = make_tiny_bundle()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle.tokenizer, "save_pretrained", broken_save)
    dataset = HFModelDataset(str(tmp_path / "model"), version=Version(None, None))
    with pytest.raises(DatasetError, match="disk full"):
        dataset.save(bundle)

    assert dataset.list_versions() == []
    assert not dataset.exists()
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())
    assert not (tmp_path / "model").exists(), "no empty version directory either"


def test_exists_is_false_before_and_true_after_a_save(tmp_path):
    plain = HFModelDataset(str(tmp_path / "plain"))
    versioned = HFModelDataset(str(tmp_path / "versioned"), version=Version(None, None))
    assert not plain.exists() and not versioned.exists()
    (tmp_path / "plain").mkdir()
    assert not plain.exists(), "an empty directory is not a saved model"
    bundle = make_tiny_bundle()
    plain.save(bundle)
    versioned.save(bundle)
    assert plain.exists() and versioned.exists()


def test_loading_a_missing_model_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match=r"no model at .*missing.*config\.json"):
        HFModelDataset(str(tmp_path / "missing")).load()
    with pytest.raises(DatasetError, match="Did not find any versions"):
        HFModelDataset(str(tmp_path / "missing"), version=Version(None, None)).load()


def test_saving_something_else_than_a_bundle_is_refused(tmp_path):
    bundle = make_tiny_bundle()
    with pytest.raises(DatasetError, match="ModelBundle"):
        HFModelDataset(str(tmp_path / "model")).save(bundle.model)


def test_bad_configuration_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="only local directories"):
        HFModelDataset("s3://bucket/model")
    with pytest.raises(ValueError, match="compressed=True takes no load_args"):
        HFModelDataset(str(tmp_path / "model"), compressed=True, load_args={"dtype": "float16"})


def test_describe_names_path_and_mode(tmp_path):
    description = str(HFModelDataset(str(tmp_path / "model"), compressed=True))
    assert "compressed=True" in description and "model" in description


def test_compressed_round_trip_keeps_low_rank_layers_and_logits(tmp_path):
    from weighted_lowrank.lowrank.layer import LowRankLinear

    bundle = make_tiny_bundle(seed=2)
    name = "bert.encoder.layer.0.intermediate.dense"
    dense = bundle.model.get_submodule(name)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    low_rank = LowRankLinear.from_factors(u[:, :4] * s[:4], vh[:4], dense.bias.detach())
    parent, child = name.rsplit(".", 1)
    setattr(bundle.model.get_submodule(parent), child, low_rank)

    dataset = HFModelDataset(
        str(tmp_path / "compressed"), compressed=True, version=Version(None, None)
    )
    dataset.save(bundle)
    loaded = dataset.load()

    restored = loaded.model.get_submodule(name)
    assert isinstance(restored, LowRankLinear) and restored.rank == 4
    assert torch.equal(_logits(loaded), _logits(bundle))
    assert loaded.tokenizer(SENTENCES)["input_ids"] == bundle.tokenizer(SENTENCES)["input_ids"]
