"""Save and reload compressed models: an HF-style directory plus ``lowrank_config.json``.

Rebuilt from the stock transformers class named there (no remote code, no pickle);
``AutoModel*.from_pretrained`` would silently re-initialise the low-rank layers.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from weighted_lowrank.lowrank.architectures import linearize_conv1d
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.layer import LowRankLinear, lowrank_modules, replace_module

#: File names inside a compressed model directory.
WEIGHTS_FILE = "model.safetensors"
LOWRANK_CONFIG_FILE = "lowrank_config.json"
LOWRANK_FORMAT_VERSION = 1
#: ``format: pt`` is what transformers expects in the safetensors header of PyTorch weights.
_SAFETENSORS_METADATA = {"format": "pt"}
_REQUIRED_KEYS = ("model_class", "dtype", "modules", "tied")


@dataclass(frozen=True)
class LayerSpec:
    """One :class:`LowRankLinear` of a saved model: its rank, sizes and whether it has a bias."""

    rank: int
    in_features: int
    out_features: int
    bias: bool


_LAYER_KEYS = tuple(item.name for item in fields(LayerSpec))


@dataclass(frozen=True)
class LowRankConfig:
    """The contents of ``lowrank_config.json`` (in the spirit of PEFT's ``LoraConfig``): the stock
    class to rebuild, the saved dtype's name, each low-rank module's :class:`LayerSpec` in model
    order, and each tied key that was not written mapped to the key holding its tensor."""

    model_class: str
    dtype: str
    modules: dict[str, LayerSpec]
    tied: dict[str, str] = field(default_factory=dict)
    format_version: int = LOWRANK_FORMAT_VERSION

    @classmethod
    def from_model(cls, model: nn.Module, tied: Mapping[str, str] | None = None) -> LowRankConfig:
        """The config of ``model`` (dtype: its first floating tensor's, else float32)."""
        floating = [
            tensor.dtype for tensor in model.state_dict().values() if tensor.is_floating_point()
        ]
        return cls(
            model_class=type(model).__name__,
            dtype=str(floating[0]).removeprefix("torch.") if floating else "float32",
            modules={
                name: LayerSpec(m.rank, m.in_features, m.out_features, m.left.bias is not None)
                for name, m in lowrank_modules(model).items()
            },
            tied=dict(tied or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``lowrank_config.json`` (key order as written since format 1)."""
        return {"format_version": self.format_version, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = LOWRANK_CONFIG_FILE) -> LowRankConfig:
        """Parse and check a ``lowrank_config.json`` object; ``source`` names it in errors."""
        version = data.get("format_version")
        if version != LOWRANK_FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version {version!r}; expected {LOWRANK_FORMAT_VERSION}"
            )
        for key in _REQUIRED_KEYS:
            if key not in data:
                raise ValueError(f"{source} has no {key!r} entry")
        modules = {}
        for name, spec in data["modules"].items():
            missing = [key for key in _LAYER_KEYS if key not in spec]
            if missing:
                raise ValueError(f"{source} module {name!r} has no {missing} entries")
            modules[name] = LayerSpec(**{key: spec[key] for key in _LAYER_KEYS})
        return cls(
            model_class=data["model_class"],
            dtype=data["dtype"],
            modules=modules,
            tied=dict(data["tied"]),
            format_version=version,
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``lowrank_config.json`` (two-space indented, final newline) into ``directory``."""
        path = Path(directory) / LOWRANK_CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LowRankConfig:
        """Read and check ``lowrank_config.json`` of a compressed model directory."""
        path = Path(directory) / LOWRANK_CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing; expected a directory written by save_compressed")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))


def tensors_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict one key per storage, ``Conv1D`` out × in; and tied aliases."""
    # Every name of every Conv1D: a module registered twice has two state-dict keys.
    conv_weights = {
        f"{name}.weight"
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, Conv1D)
    }
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        if key in conv_weights:
            tensor = tensor.t()
        tensors[key] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def serialized_size_bytes(model: nn.Module) -> int:
    """Size in bytes of the ``model.safetensors`` that :func:`save_compressed` writes for ``model``."""
    tensors, _ = tensors_for_saving(model)
    return len(save(tensors, metadata=_SAFETENSORS_METADATA))


def parameter_counts(tensors: Mapping[str, torch.Tensor], modules: Iterable[str]) -> dict[str, int]:
    """Elements of the saved tensors: ``{"layers": under the keys "<module>.", "model": all}``."""
    prefixes = tuple(f"{name}." for name in modules)
    layers = sum(tensor.numel() for key, tensor in tensors.items() if key.startswith(prefixes))
    return {"layers": int(layers), "model": int(sum(tensor.numel() for tensor in tensors.values()))}


def save_compressed(
    model: PreTrainedModel, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> None:
    """Write ``model``'s config, factors, ``lowrank_config.json`` (and tokenizer)."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"save_compressed expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    class_name = type(model).__name__
    if getattr(transformers, class_name, None) is not type(model):
        raise ValueError(
            f"model class {class_name} is not a stock transformers class; load_compressed could not rebuild it"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = tensors_for_saving(model)
    config = copy.deepcopy(model.config)
    config.architectures = [class_name]
    config.save_pretrained(directory)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata=_SAFETENSORS_METADATA)
    LowRankConfig.from_model(model, aliases).save(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_compressed(directory: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model :func:`save_compressed` wrote, in eval mode on ``device``."""
    directory = Path(directory)
    for file_name in ("config.json", WEIGHTS_FILE):
        if not (directory / file_name).is_file():
            raise ValueError(
                f"{directory / file_name} is missing; expected a directory written by save_compressed"
            )
    lowrank_config = LowRankConfig.load(directory)
    model = _rebuild(directory, lowrank_config)
    model.load_state_dict(_checked_tensors(directory, model, lowrank_config.tied), strict=True)
    model.eval()
    return model.to(resolve_device(device))


def _rebuild(directory: Path, lowrank_config: LowRankConfig) -> PreTrainedModel:
    """The named stock class from ``config.json``, with the saved low-rank layers in place."""
    source = directory / LOWRANK_CONFIG_FILE
    model_class = getattr(transformers, lowrank_config.model_class, None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(
            f"{source} names model class {lowrank_config.model_class!r}, "
            "which is not a transformers PreTrainedModel class"
        )
    dtype = getattr(torch, lowrank_config.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{source} has an unknown dtype {lowrank_config.dtype!r}")
    model = model_class(AutoConfig.from_pretrained(directory)).to(dtype)
    # Conv1D weights are saved in nn.Linear layout (tensors_for_saving).
    linearize_conv1d(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, spec in lowrank_config.modules.items():
        dense = modules.get(name)
        shape = (spec.out_features, spec.in_features)
        if not isinstance(dense, nn.Linear) or (dense.out_features, dense.in_features) != shape:
            raise ValueError(
                f"low-rank module {name!r} ({shape[0]}x{shape[1]}) does not replace an nn.Linear "
                f"of that shape in {model_class.__name__}; found {dense}"
            )
        layer = LowRankLinear(spec.in_features, shape[0], spec.rank, bias=spec.bias, dtype=dtype)
        replace_module(model, name, layer)
    return model


def _checked_tensors(
    directory: Path, model: nn.Module, tied: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """``model.safetensors`` with the tied aliases filled in, once its keys and shapes fit."""
    tensors = load_file(str(directory / WEIGHTS_FILE))
    tensors.update({alias: tensors[source] for alias, source in tied.items() if source in tensors})
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match {type(model).__name__} with the low-rank "
            f"modules of {LOWRANK_CONFIG_FILE}: missing keys {missing[:10]}, unexpected keys "
            f"{unexpected[:10]}"
        )
    wrong = {
        key: (tuple(tensor.shape), expected[key])
        for key, tensor in tensors.items()
        if tuple(tensor.shape) != expected[key]
    }
    if wrong:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} has tensors whose (saved, expected) shapes differ: "
            f"{dict(list(wrong.items())[:5])}; {LOWRANK_CONFIG_FILE} does not match the weights"
        )
    return tensors
