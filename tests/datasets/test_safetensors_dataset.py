"""SafetensorsDataset: round trip with header metadata, versioning and error messages."""

from __future__ import annotations

import pytest
import torch
from kedro.io.core import DatasetError, Version
from safetensors import safe_open

from weighted_lowrank.datasets import SafetensorsDataset


def _tensor_file(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "tensors": {
            "layer.0.weight": torch.rand(6, 4, generator=generator),
            # A transposed view is not contiguous: the dataset must still write it faithfully.
            "layer.1.weight": torch.rand(3, 5, generator=generator).t(),
            "counts": torch.arange(7, dtype=torch.int64),
            "half": torch.rand(2, 2, generator=generator).to(torch.float16),
        },
        "metadata": {"mode": "per_example", "num_examples": "128", "seed": str(seed)},
    }


def _assert_same(loaded: dict, expected: dict) -> None:
    assert set(loaded) == {"tensors", "metadata"}
    assert loaded["metadata"] == expected["metadata"]
    assert set(loaded["tensors"]) == set(expected["tensors"])
    for name, tensor in expected["tensors"].items():
        assert loaded["tensors"][name].dtype == tensor.dtype
        assert torch.equal(loaded["tensors"][name], tensor), name


def test_round_trip_keeps_tensors_dtypes_and_header_metadata(tmp_path):
    path = tmp_path / "fisher.safetensors"
    data = _tensor_file(seed=0)
    dataset = SafetensorsDataset(str(path))
    dataset.save(data)
    _assert_same(dataset.load(), data)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == data["metadata"]


def test_missing_metadata_loads_as_empty_dict(tmp_path):
    dataset = SafetensorsDataset(str(tmp_path / "t.safetensors"))
    dataset.save({"tensors": {"w": torch.ones(2)}})
    assert dataset.load()["metadata"] == {}


def test_two_saves_make_two_versions_latest_loads_and_pinned_loads_older(tmp_path):
    path = str(tmp_path / "fisher.safetensors")
    dataset = SafetensorsDataset(path, version=Version(None, None))
    older, newer = _tensor_file(seed=0), _tensor_file(seed=1)
    dataset.save(older)
    dataset.save(newer)

    versions = dataset.list_versions(full_path=False)
    assert len(versions) == 2
    _assert_same(dataset.load(), newer)
    _assert_same(SafetensorsDataset(path, version=Version(versions[1], None)).load(), older)
    assert not any(p.name.startswith(".") for p in (tmp_path / "fisher.safetensors").rglob("*"))


def test_exists_and_missing_file_errors(tmp_path):
    plain = SafetensorsDataset(str(tmp_path / "a.safetensors"))
    versioned = SafetensorsDataset(str(tmp_path / "b.safetensors"), version=Version(None, None))
    assert not plain.exists() and not versioned.exists()
    with pytest.raises(DatasetError, match=r"no file at .*a\.safetensors"):
        plain.load()
    with pytest.raises(DatasetError, match="Did not find any versions"):
        versioned.load()
    plain.save({"tensors": {"w": torch.zeros(1)}, "metadata": {}})
    versioned.save({"tensors": {"w": torch.zeros(1)}, "metadata": {}})
    assert plain.exists() and versioned.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"weights": {}}, "keys 'tensors'"),
        ({"tensors": {"w": torch.ones(1)}, "extra": 1}, "keys 'tensors'"),
        ({"tensors": {"w": [1.0, 2.0]}}, "offending entries: \\['w'\\]"),
        ({"tensors": {"w": torch.ones(1)}, "metadata": {"num_examples": 12}}, "dict\\[str, str\\]"),
    ],
)
def test_malformed_objects_are_refused_before_writing(tmp_path, data, message):
    dataset = SafetensorsDataset(str(tmp_path / "t.safetensors"))
    with pytest.raises(DatasetError, match=message):
        dataset.save(data)
    assert list(tmp_path.iterdir()) == []


def test_remote_paths_are_refused():
    with pytest.raises(ValueError, match="only local files"):
        SafetensorsDataset("gcs://bucket/fisher.safetensors")
