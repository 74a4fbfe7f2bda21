"""Versioned Kedro dataset for a Hugging Face model directory (sequence classifier or causal LM)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from copy import deepcopy
from pathlib import Path
from typing import Any

from kedro.io.core import DatasetError, Version

from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.kedro_glue.datasets.integrity import VersionChecked, safetensors_problem
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY

_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"
#: Written by save_compressed (lowrank/serialization.py, imported lazily: it loads the core).
LOWRANK_CONFIG_FILE = "lowrank_config.json"
#: Written beside the weights: which fine-tuned model the saved one derives from (``lineage``).
LINEAGE_FILE = "lineage.json"


class HFModelDataset(VersionChecked):
    """Saves/loads a ``ModelBundle`` (model + tokenizer, eval mode) as a Hugging Face directory,
    through ``lowrank.serialization.save_compressed`` when ``compressed`` (``LowRankLinear``
    layers). A save is written to a hidden sibling directory and renamed into place, so a crashed
    save is never a loadable version; incomplete files fail to load naming the previous complete
    version (:mod:`.integrity`). Example catalog entry::

        fine_tuned_model:
          type: weighted_lowrank.kedro_glue.datasets.HFModelDataset
          filepath: data/06_models/fine_tuned_model
          versioned: true
    """

    stored_as = "directories (transformers saves to local paths)"

    def __init__(
        self,
        filepath: str | os.PathLike,
        compressed: bool = False,
        version: Version | None = None,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """``load_args``/``save_args``: for ``from_pretrained``/``save_pretrained`` (plain
        models only)."""
        if compressed and (load_args or save_args):
            raise ValueError(
                "HFModelDataset with compressed=True takes no load_args/save_args "
                "(save_compressed/load_compressed have no options); remove them"
            )
        self._compressed = bool(compressed)
        self._load_args = deepcopy(load_args) or {}
        self._save_args = deepcopy(save_args) or {}
        self.metadata = metadata
        super().__init__(filepath, version)

    def load(self) -> ModelBundle:
        self.check_load_version()
        load_path = self.load_path()
        if not (load_path / _CONFIG_FILE).is_file():
            raise DatasetError(
                f"HFModelDataset: no model at {str(load_path)!r} (expected a directory with "
                f"{_CONFIG_FILE}); run the pipeline that saves it first"
            )
        try:
            return self._load_directory(str(load_path))
        except Exception as error:
            problem = f"loading it failed with {type(error).__name__}: {error}"
            raise self._unloadable(load_path, problem) from error

    def _problem(self, directory: Path) -> str | None:
        """What makes the model directory ``directory`` unloadable; reads headers only."""
        for name in (_CONFIG_FILE, *((LOWRANK_CONFIG_FILE,) if self._compressed else ())):
            if not (directory / name).is_file():
                return f"{name} is missing"
            try:
                json.loads((directory / name).read_text())
            except (OSError, ValueError) as error:
                return f"{name} is not readable JSON ({error})"
        weights = sorted(directory.glob("*.safetensors"))
        index = directory / f"{_WEIGHTS_FILE}.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as error:
                return f"{index.name} is not a readable shard index ({error})"
            missing = sorted(shards - {file.name for file in weights})
            if missing:
                return f"the shards {missing} listed in {index.name} are missing"
        elif not weights and not (directory / "pytorch_model.bin").is_file():
            return f"{_WEIGHTS_FILE} is missing"
        for file in weights:
            problem = safetensors_problem(file)
            if problem is not None:
                return problem
        return None

    def lowrank_ranks_at(self, version: str) -> dict[str, int] | None:
        """``{module: rank}`` of the compressed model saved as ``version`` (None when its files are
        incomplete; an error when it is not a compressed model)."""
        path = self.path_of(version)
        if self._problem(path) is not None:
            return None
        modules = json.loads((path / LOWRANK_CONFIG_FILE).read_text())["modules"]
        return {str(name): int(spec["rank"]) for name, spec in modules.items()}

    def _load_directory(self, load_path: str) -> ModelBundle:
        from transformers import AutoConfig, AutoTokenizer

        from weighted_lowrank.hf.models import auto_model_class, prepare_tokenizer, task_of_config
        from weighted_lowrank.lowrank.architectures import linearize_conv1d

        if self._compressed:
            from weighted_lowrank.lowrank.serialization import load_compressed

            model = load_compressed(load_path)
        else:
            # The saved class (config.json's architectures): a sequence classifier or a causal LM.
            task = task_of_config(AutoConfig.from_pretrained(load_path))
            model = auto_model_class(task).from_pretrained(load_path, **self._load_args)
            linearize_conv1d(model)
        model.eval()
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(load_path))
        return ModelBundle(
            model=model, tokenizer=tokenizer, model_fingerprint=_read_fingerprint(Path(load_path))
        )

    def fingerprint_at(self, version: str) -> str | None:
        """The lineage fingerprint of the saved ``version`` (None if none, or files incomplete)."""
        path = self.path_of(version)
        return None if self._problem(path) is not None else _read_fingerprint(path)

    def save(self, data: ModelBundle) -> None:
        if not isinstance(data, ModelBundle):
            raise DatasetError(
                f"HFModelDataset saves a weighted_lowrank.hf.models.ModelBundle, got {type(data).__name__}"
            )
        target = self.path_of(self.resolve_save_version())
        # The staging directory sits next to the dataset root, outside the `<root>/*/<name>`
        # glob Kedro uses to find versions, so a half-written save is never listed.
        staging = self.root.with_name(f".{self.root.name}.partial-{uuid.uuid4().hex}")
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

    def _write_directory(self, data: ModelBundle, directory: Path) -> None:
        if self._compressed:
            from weighted_lowrank.lowrank.serialization import save_compressed

            save_compressed(data.model, str(directory), data.tokenizer)
        else:
            from weighted_lowrank.lowrank.architectures import save_pretrained_model

            # GPT-2's layers go back to the Conv1D layout stock from_pretrained expects.
            save_pretrained_model(data.model, str(directory), **self._save_args)
            data.tokenizer.save_pretrained(str(directory))
        if data.model_fingerprint is not None:
            lineage = {FINGERPRINT_KEY: data.model_fingerprint}
            (directory / LINEAGE_FILE).write_text(json.dumps(lineage) + "\n")

    def _exists(self) -> bool:
        return (self.load_path() / _CONFIG_FILE).is_file()

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "compressed": self._compressed}


def _read_fingerprint(directory: Path) -> str | None:
    path = directory / LINEAGE_FILE
    if not path.is_file():
        return None  # saved before lineage was recorded
    return json.loads(path.read_text()).get(FINGERPRINT_KEY)
