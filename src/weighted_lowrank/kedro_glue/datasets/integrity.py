"""Saved versions that cannot be loaded: what is wrong, and which older version can be. A
version's files (sizes and headers; no tensor read) are checked before the loader, whose own error
names neither dataset, version, nor what to load instead; nothing on disk is changed.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    VersionNotFoundError,
    get_protocol_and_path,
)

_LENGTH_FIELD = 8  # a safetensors file starts with its header's length, u64 little-endian


def safetensors_problem(path: str | Path) -> str | None:
    """What makes ``path`` an unloadable safetensors file, or ``None``: its header is read and
    checked against the file's size; no tensor is read."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size < _LENGTH_FIELD:
        return f"{name} is {size} bytes long, shorter than a safetensors header"
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(_LENGTH_FIELD), "little")
        if header_size > size - _LENGTH_FIELD:
            return (
                f"{name} is truncated or not a safetensors file: its first 8 bytes announce a "
                f"{header_size}-byte header, the file holds {size} bytes"
            )
        try:
            header = json.loads(handle.read(header_size))
            ends = [
                int(entry["data_offsets"][1])
                for key, entry in header.items()
                if key != "__metadata__"
            ]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            return f"{name} has an unreadable safetensors header ({type(error).__name__}: {error})"
    expected = _LENGTH_FIELD + header_size + max(ends, default=0)
    if size < expected:
        return (
            f"{name} is truncated: its header describes {expected} bytes, the file holds {size} "
            "(a save or copy that did not finish)"
        )
    if size > expected:
        return f"{name} holds {size - expected} bytes beyond the tensors its header describes"
    from safetensors import safe_open

    try:  # the remaining rules (dtypes, shapes against offsets); maps the file, reads no tensor
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own SafetensorError
        return f"{name} is not a valid safetensors file ({error})"
    return None


class UnloadableVersionError(DatasetError):
    """A saved version that cannot be loaded; the message names the dataset, the version and its
    directory, what is wrong, and the previous version whose files are complete (or none)."""


class VersionChecked(AbstractVersionedDataset):
    """Base of the project's local versioned datasets (Kedro's public versioning API only): where
    a version lies (:meth:`path_of`) and whether its files are complete. A subclass implements
    :meth:`_problem`, calls :meth:`check_load_version` in ``load`` and raises :meth:`_unloadable`
    for an error the loader raises despite complete files."""

    #: What a version is on disk, for the error on a remote path.
    stored_as = "files"

    def __init__(self, filepath: str | os.PathLike, version: Version | None) -> None:
        protocol, path = get_protocol_and_path(filepath, version)
        if protocol != "file":
            raise ValueError(
                f"{type(self).__name__} filepath {str(filepath)!r} uses protocol {protocol!r}; "
                f"only local {self.stored_as} are supported"
            )
        self.root = Path(path)
        self.version_spec = version
        super().__init__(filepath=PurePosixPath(path), version=version)

    def path_of(self, version: str | None) -> Path:
        """Where ``version`` lies: ``<root>/<version>/<name>`` (the root itself unversioned)."""
        return self.root if version is None else self.root / version / self.root.name

    def load_path(self) -> Path:
        return self.path_of(self.resolve_load_version())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self.root), "version": self.version_spec}

    @abstractmethod
    def _problem(self, path: Path) -> str | None:
        """What is wrong with the files of the version at ``path``, or None if they are complete."""

    def check_load_version(self, entry: str | None = None) -> None:
        """Raise :class:`UnloadableVersionError` (naming ``entry``, the catalog name, when given)
        if the files of the version to load are incomplete. Reads sizes and headers only."""
        try:
            path = self.load_path()
        except VersionNotFoundError:
            return  # no version at all: load() says so
        problem = self._problem(path) if path.exists() else None  # nothing saved: load() says so
        if problem is not None:
            raise self._unloadable(path, problem, entry)

    def _unloadable(
        self, path: Path, problem: str, entry: str | None = None
    ) -> UnloadableVersionError:
        """The error for the version at ``path``, naming ``entry`` (the catalog name) if known."""
        version = self.resolve_load_version()
        previous = self._previous_complete(version)
        what = f"catalog entry {entry!r}" if entry else type(self).__name__
        where = f"version {version} ({path})" if version else str(path)
        entry = entry or "<catalog entry>"
        if previous is not None:
            fix = (
                f"the previous version with complete files is {previous}: pin it with "
                f"--load-versions={entry}:{previous} (or move the broken version directory aside)"
            )
        else:
            fix = f"re-run the pipeline that makes {entry} (e.g. kedro run --to-outputs={entry})"
            if version is not None:
                fix = f"no older version has complete files: {fix}"
        return UnloadableVersionError(
            f"{what} cannot be loaded from {where}: {problem}. Nothing on disk was changed; {fix}"
        )

    def _previous_complete(self, version: str | None) -> str | None:
        """The newest version older than ``version`` whose files are complete."""
        if version is None:
            return None
        try:
            versions = self.list_versions(full_path=False)  # newest first
        except VersionNotFoundError:
            return None
        older = (name for name in versions if name < version)
        return next((name for name in older if self._problem(self.path_of(name)) is None), None)
