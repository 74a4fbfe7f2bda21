"""Versioned Kedro dataset for a Hugging Face sequence-classification model directory."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from copy import deepcopy
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lineage import FINGERPRINT_KEY

_CONFIG_FILE = "config.json"
#: Written beside the weights: which fine-tuned model the saved one derives from (``lineage``).
LINEAGE_FILE = "lineage.json"


class HFModelDataset(AbstractVersionedDataset[ModelBundle, ModelBundle]):
    """Saves/loads a ``ModelBundle`` (model + tokenizer) as a Hugging Face directory.

    ``save`` writes ``model.save_pretrained`` (safetensors) and ``tokenizer.save_pretrained`` into
    one directory, or ``weighted_lowrank.lowrank.serialization.save_compressed`` when ``compressed`` is
    true (models holding ``LowRankLinear`` layers). ``load`` returns a ``ModelBundle`` in eval
    mode. With ``versioned: true`` each save is a new directory
    ``<filepath>/<version>/<name>``; a save is written to a hidden sibling directory first and
    renamed into place, so a crashed save never shows up as a loadable version.

    Example catalog entry::

        fine_tuned_model:
          type: weighted_lowrank.datasets.HFModelDataset
          filepath: data/06_models/fine_tuned_model
          versioned: true
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        compressed: bool = False,
        version: Version | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Creates a new ``HFModelDataset``.

        Args:
            filepath: Local directory (optionally ``file://``) holding the model.
            compressed: Save/load through ``save_compressed``/``load_compressed`` (low-rank
                layers) instead of ``save_pretrained``/``from_pretrained``.
            version: Kedro version (set by the catalog from ``versioned: true``).
            load_args: Keyword arguments for ``AutoModelForSequenceClassification.from_pretrained``
                (plain models only).
            save_args: Keyword arguments for ``model.save_pretrained`` (plain models only).
            metadata: Free-form metadata, ignored by Kedro.
        """
        protocol, path = get_protocol_and_path(filepath, version)
        if protocol != "file":
            raise ValueError(
                f"HFModelDataset filepath {str(filepath)!r} uses protocol {protocol!r}; only "
                "local directories are supported (transformers saves to local paths)"
            )
        if compressed and (load_args or save_args):
            raise ValueError(
                "HFModelDataset with compressed=True takes no load_args/save_args "
                "(save_compressed/load_compressed have no options); remove them"
            )
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol)
        self._compressed = bool(compressed)
        self._load_args = deepcopy(load_args) or {}
        self._save_args = deepcopy(save_args) or {}
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def load(self) -> ModelBundle:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        if not self._fs.isfile(f"{load_path}/{_CONFIG_FILE}"):
            raise DatasetError(
                f"HFModelDataset: no model at {load_path!r} (expected a directory with "
                f"{_CONFIG_FILE}); run the pipeline that saves it first"
            )
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self._compressed:
            from weighted_lowrank.lowrank.serialization import load_compressed

            model = load_compressed(load_path)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(load_path, **self._load_args)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(load_path)
        return ModelBundle(
            model=model, tokenizer=tokenizer, model_fingerprint=_read_fingerprint(load_path)
        )

    def fingerprint_at(self, version: str) -> str | None:
        """The lineage fingerprint recorded by the saved ``version`` (None if it has none)."""
        return _read_fingerprint(
            get_filepath_str(self._get_versioned_path(version), self._protocol)
        )

    def save(self, data: ModelBundle) -> None:
        if not isinstance(data, ModelBundle):
            raise DatasetError(
                f"HFModelDataset saves a weighted_lowrank.hf.ModelBundle, got {type(data).__name__}"
            )
        target = Path(get_filepath_str(self._get_save_path(), self._protocol))
        # The staging directory sits next to the dataset root, outside the `<root>/*/<name>`
        # glob Kedro uses to find versions, so a half-written save is never listed.
        staging = Path(self._filepath.parent.as_posix()) / (
            f".{self._filepath.name}.partial-{uuid.uuid4().hex}"
        )
        try:
            self._write_directory(data, staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                # Only reachable unversioned: swap the old directory out, then delete it.
                retired = staging.with_name(staging.name + "-old")
                os.replace(target, retired)
                os.replace(staging, target)
                shutil.rmtree(retired)
            else:
                os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        self._fs.invalidate_cache(self._filepath.as_posix())

    def _write_directory(self, data: ModelBundle, directory: Path) -> None:
        if self._compressed:
            from weighted_lowrank.lowrank.serialization import save_compressed

            save_compressed(data.model, str(directory), data.tokenizer)
            if not (directory / _CONFIG_FILE).is_file():
                raise DatasetError(f"save_compressed wrote no {_CONFIG_FILE} into {directory}")
            if not any(directory.glob("tokenizer*")):
                data.tokenizer.save_pretrained(str(directory))
        else:
            data.model.save_pretrained(str(directory), **self._save_args)
            data.tokenizer.save_pretrained(str(directory))
        if data.model_fingerprint is not None:
            lineage = {FINGERPRINT_KEY: data.model_fingerprint}
            (directory / LINEAGE_FILE).write_text(json.dumps(lineage) + "\n")

    def _exists(self) -> bool:
        try:
            load_path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.isfile(f"{load_path}/{_CONFIG_FILE}")

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": self._filepath,
            "protocol": self._protocol,
            "compressed": self._compressed,
            "version": self._version,
            "load_args": self._load_args,
            "save_args": self._save_args,
        }

    def _release(self) -> None:
        super()._release()
        self._fs.invalidate_cache(self._filepath.as_posix())


def _read_fingerprint(directory: str) -> str | None:
    path = Path(directory) / LINEAGE_FILE
    if not path.is_file():
        return None  # saved before lineage was recorded
    return json.loads(path.read_text()).get(FINGERPRINT_KEY)
