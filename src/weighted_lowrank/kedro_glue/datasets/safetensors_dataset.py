"""Versioned Kedro dataset for a named dict of tensors in one safetensors file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from kedro.io.core import DatasetError, Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weighted_lowrank.kedro_glue.datasets.integrity import VersionChecked, safetensors_problem
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY

TensorFile = dict[str, Any]
"""``{"tensors": dict[str, torch.Tensor], "metadata": dict[str, str]}``."""

_ALLOWED_KEYS = {"tensors", "metadata"}


class SafetensorsDataset(VersionChecked):
    """Saves/loads ``{"tensors": {name: Tensor}, "metadata": {str: str}}`` as a safetensors file
    (metadata in its header; tensors loaded on CPU; no pickle). A save writes a temporary file and
    renames it, so readers never see a partial file; a damaged file fails to load naming the
    previous complete version (:mod:`.integrity`). Example catalog entry::

        fisher_information:
          type: weighted_lowrank.kedro_glue.datasets.SafetensorsDataset
          filepath: data/04_feature/fisher_information.safetensors
          versioned: true
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """``metadata``: Kedro's free-form metadata (not the file's header metadata)."""
        self.metadata = metadata
        super().__init__(filepath, version)

    def load(self) -> TensorFile:
        path = self.load_path()
        if not path.is_file():
            raise DatasetError(
                f"SafetensorsDataset: no file at {str(path)!r}; run the pipeline that saves it first"
            )
        self.check_load_version()
        try:
            tensors = load_file(path, device="cpu")
            header_metadata = _header_metadata(path)
        except Exception as error:  # safetensors' SafetensorError, OSError
            problem = f"loading it failed with {type(error).__name__}: {error}"
            raise self._unloadable(path, problem) from error
        return {"tensors": tensors, "metadata": header_metadata}

    def _problem(self, path: Path) -> str | None:
        return safetensors_problem(path)

    def fingerprint_at(self, version: str) -> str | None:
        """The lineage fingerprint of the saved ``version`` (None if none, or the file is damaged)."""
        path = self.path_of(version)
        return None if safetensors_problem(path) else _header_metadata(path).get(FINGERPRINT_KEY)

    def save(self, data: TensorFile) -> None:
        tensors, header_metadata = _validated(data)
        target = self.path_of(self.resolve_save_version())
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
        try:
            save_file(tensors, str(staging), metadata=header_metadata)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)

    def _exists(self) -> bool:
        return self.load_path().is_file()


def _header_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata() or {})


def _validated(data: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check the object shape and return (contiguous CPU tensors, string metadata)."""
    if not isinstance(data, dict) or "tensors" not in data or not set(data) <= _ALLOWED_KEYS:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(
            "SafetensorsDataset saves a dict with keys 'tensors' (dict[str, Tensor]) and optional "
            f"'metadata' (dict[str, str]); got {keys}"
        )
    tensors = data["tensors"]
    bad = (
        [n for n, v in tensors.items() if not isinstance(n, str) or not torch.is_tensor(v)]
        if isinstance(tensors, dict)
        else [f"not a dict but a {type(tensors).__name__}"]
    )
    if bad:
        raise DatasetError(f"'tensors' must map str to torch.Tensor; offending entries: {bad[:5]}")
    header_metadata = data.get("metadata") or {}
    if not isinstance(header_metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in header_metadata.items()
    ):
        raise DatasetError(
            "'metadata' must be a dict[str, str] (safetensors headers hold strings only); "
            "convert numbers and lists with str()/json.dumps() first"
        )
    prepared = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
    return prepared, dict(header_metadata)
