"""Versioned Kedro dataset for a named dict of tensors in one safetensors file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weighted_lowrank.kedro_glue.datasets.integrity import VersionChecked, safetensors_problem
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY

TensorFile = dict[str, Any]
"""``{"tensors": dict[str, torch.Tensor], "metadata": dict[str, str]}``."""

_ALLOWED_KEYS = {"tensors", "metadata"}


class SafetensorsDataset(VersionChecked, AbstractVersionedDataset[TensorFile, TensorFile]):
    """Saves/loads ``{"tensors": {name: Tensor}, "metadata": {str: str}}`` as a safetensors file.

    The metadata dict goes into the safetensors header (strings only, as the format requires);
    tensors are written contiguous and loaded on CPU. No pickle is involved either way. A save
    writes a temporary file in the target directory and renames it, so readers never see a
    partial file; a file truncated or damaged anyway fails to load with an
    :class:`~weighted_lowrank.kedro_glue.datasets.integrity.UnloadableVersionError` naming the version and
    the previous complete one.

    Example catalog entry::

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
        """Creates a new ``SafetensorsDataset``.

        Args:
            filepath: Local path of the ``.safetensors`` file (optionally ``file://``).
            version: Kedro version (set by the catalog from ``versioned: true``).
            metadata: Free-form Kedro metadata (not the file's header metadata), ignored by Kedro.
        """
        protocol, path = get_protocol_and_path(filepath, version)
        if protocol != "file":
            raise ValueError(
                f"SafetensorsDataset filepath {str(filepath)!r} uses protocol {protocol!r}; "
                "only local files are supported"
            )
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol)
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def load(self) -> TensorFile:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        if not self._fs.isfile(load_path):
            raise DatasetError(
                f"SafetensorsDataset: no file at {load_path!r}; run the pipeline that saves it first"
            )
        self.check_load_version()
        try:
            tensors = load_file(load_path, device="cpu")
            with safe_open(load_path, framework="pt") as handle:
                header_metadata = handle.metadata() or {}
        except Exception as error:  # safetensors' SafetensorError, OSError
            problem = f"loading it failed with {type(error).__name__}: {error}"
            raise self._unloadable(load_path, problem) from error
        return {"tensors": tensors, "metadata": dict(header_metadata)}

    def _problem(self, path: str) -> str | None:
        """What makes the file ``path`` unloadable (:class:`VersionChecked`); header only."""
        return safetensors_problem(path)

    def fingerprint_at(self, version: str) -> str | None:
        """The lineage fingerprint in the header of the saved ``version`` (None if it has none)."""
        path = get_filepath_str(self._get_versioned_path(version), self._protocol)
        if safetensors_problem(path) is not None:
            return None  # an incomplete version matches nothing
        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get(FINGERPRINT_KEY)

    def save(self, data: TensorFile) -> None:
        tensors, header_metadata = _validated(data)
        target = Path(get_filepath_str(self._get_save_path(), self._protocol))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex}")
        try:
            save_file(tensors, str(staging), metadata=header_metadata)
            os.replace(staging, target)
        finally:
            if staging.exists():
                staging.unlink()
        self._fs.invalidate_cache(self._filepath.as_posix())

    def _exists(self) -> bool:
        try:
            load_path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.isfile(load_path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "version": self._version}

    def _release(self) -> None:
        super()._release()
        self._fs.invalidate_cache(self._filepath.as_posix())


def _validated(data: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check the object shape and return (contiguous CPU tensors, string metadata)."""
    if not isinstance(data, dict) or "tensors" not in data or not set(data) <= _ALLOWED_KEYS:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(
            "SafetensorsDataset saves a dict with keys 'tensors' (dict[str, Tensor]) and optional "
            f"'metadata' (dict[str, str]); got {keys}"
        )
    tensors = data["tensors"]
    if not isinstance(tensors, dict):
        raise DatasetError(f"'tensors' must be a dict[str, Tensor], got {type(tensors).__name__}")
    bad = [
        name
        for name, value in tensors.items()
        if not isinstance(name, str) or not isinstance(value, torch.Tensor)
    ]
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
