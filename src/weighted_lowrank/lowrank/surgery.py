"""Model surgery: replace targeted ``nn.Linear`` layers by low-rank factors, save and reload them.

A compressed layer computes ``y = left(right(x)) = x·Bᵀ·Aᵀ + bias`` with ``B = right.weight``
(rank × in) and ``A = left.weight`` (out × rank), the factors ``W ≈ A·B`` of
:class:`~weighted_lowrank.lowrank.objective.FactorizationResult` (``left`` = A, ``right`` = B).
The safetensors keys of a compressed layer ``m`` are therefore ``m.right.weight``,
``m.left.weight`` and ``m.left.bias``.

A compressed model is saved as an HF-style directory (``config.json``, tokenizer files,
``model.safetensors`` holding the factors, ``lowrank_config.json`` naming every low-rank module and
its rank) and rebuilt from the stock transformers class named in ``lowrank_config.json``: no remote
code, no pickle. ``AutoModel*.from_pretrained`` on such a directory would silently re-initialise
the dense layers it cannot find; always reload it with :func:`load_compressed`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.objective import rank_for_budget, relative_loss
from weighted_lowrank.lowrank.solvers import SOLVERS, factorize_batch
from weighted_lowrank.lowrank.targets import select_linear_modules

#: File names inside a compressed model directory.
WEIGHTS_FILE = "model.safetensors"
LOWRANK_CONFIG_FILE = "lowrank_config.json"
LOWRANK_FORMAT_VERSION = 1
#: ``format: pt`` is what transformers expects in the safetensors header of PyTorch weights.
_SAFETENSORS_METADATA = {"format": "pt"}


class LowRankLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` computing ``left(right(x))`` with a rank bottleneck.

    Same ``forward(input)`` signature and ``in_features`` / ``out_features`` attributes as
    ``nn.Linear`` but no ``weight``: the dense product is available from :meth:`dense_weight`.
    Parameters: ``rank·(in_features + out_features)`` (+ ``out_features`` for the bias).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("rank", rank),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LowRankLinear {name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.right = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.left = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build the layer ``x ↦ x·rightᵀ·leftᵀ + bias`` from ``left`` (out × r) and ``right`` (r × in)."""
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(
                f"factors must be left (out, r) and right (r, in); got {tuple(left.shape)} and "
                f"{tuple(right.shape)}"
            )
        out_features, rank = left.shape
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(
            right.shape[1],
            out_features,
            rank,
            bias=bias is not None,
            device=left.device,
            dtype=left.dtype,
        )
        with torch.no_grad():
            layer.left.weight.copy_(left)
            layer.right.weight.copy_(right)
            if bias is not None:
                layer.left.bias.copy_(bias)
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        """The output bias, as on ``nn.Linear``."""
        return self.left.bias

    def dense_weight(self) -> torch.Tensor:
        """The (out × in) matrix ``left.weight @ right.weight`` this layer applies."""
        return self.left.weight @ self.right.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.left(self.right(input))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.left.bias is not None}"
        )


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """``{module name: LowRankLinear}`` of a model, in model order."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)
    }


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    """``{module name: rank}`` of a model's :class:`LowRankLinear` layers, in model order."""
    return {name: module.rank for name, module in lowrank_modules(model).items()}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def _check_ranks(shapes: Mapping[str, tuple[int, int]], budget: float) -> dict[str, int]:
    ranks = {}
    for name, (out_features, in_features) in shapes.items():
        dense = out_features * in_features
        smallest = (out_features + in_features) / dense
        try:
            rank = rank_for_budget((out_features, in_features), budget)
        except ValueError as exc:
            raise ValueError(
                f"budget {budget} gives rank 0 for layer {name!r} ({out_features}x{in_features}): {exc}; "
                f"expected a budget of at least {smallest:.4g} so that every targeted layer keeps rank 1"
            ) from exc
        if rank < 1:
            raise ValueError(
                f"budget {budget} gives rank {rank} for layer {name!r} ({out_features}x{in_features}); "
                f"expected a budget of at least {smallest:.4g} so that every targeted layer keeps rank 1"
            )
        if rank * (out_features + in_features) >= dense:
            raise ValueError(
                f"rank {rank} for layer {name!r} ({out_features}x{in_features}) keeps "
                f"{rank * (out_features + in_features)} parameters, not fewer than the dense {dense}; "
                "expected a budget that saves parameters in every layer"
            )
        ranks[name] = rank
    return ranks


def compress_model(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor] | None,
    budget: float,
    solver: str,
    targets: str | Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    **solver_options: Any,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Factorize the targeted Linear layers and return ``(compressed deep copy, per-layer report)``.

    ``fisher`` maps ``"<module>.weight"`` to an importance tensor shaped like the weight
    (``None``: uniform importance, i.e. plain SVD weighting). ``budget`` ∈ (0, 1) is the fraction of
    each layer's dense weight parameters kept, rank from
    :func:`~weighted_lowrank.lowrank.objective.rank_for_budget`; a layer where that rank is 0 or
    saves nothing raises ``ValueError`` before any factorization. ``device`` is where the solver
    runs; the factors go back to the model's device and dtype. ``solver_options`` go to
    :func:`~weighted_lowrank.lowrank.solvers.factorize_batch`.

    Report rows: module, shape, out_features, in_features, rank, params_before, params_after
    (weight + bias of that layer), weighted_loss, svd_loss (plain SVD at the same rank under the
    same importance), loss_rel_svd, initial_loss, seconds (the layer's share of the wall time of its
    batched group of same-shape layers), total_seconds (wall time of the whole factorization, the
    same on every row; the SVD reference is not included), iterations, solver, history (JSON list
    of [seconds since its group started, loss]) and info (JSON).
    """
    if not isinstance(budget, int | float) or isinstance(budget, bool) or not 0 < budget < 1:
        raise ValueError(
            f"budget must be a fraction in (0, 1) of dense layer parameters, got {budget!r}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is unknown; expected one of {list(SOLVERS)}")
    modules = select_linear_modules(model, targets)
    shapes = {name: tuple(module.weight.shape) for name, module in modules.items()}
    if fisher is not None:
        missing = [f"{name}.weight" for name in modules if f"{name}.weight" not in fisher]
        if missing:
            raise ValueError(
                f"fisher has no importance for {missing[:5]} ({len(missing)} targeted weights); "
                f"expected keys '<module>.weight' for every targeted module, got e.g. {sorted(fisher)[:5]}"
            )
        wrong = {
            f"{name}.weight": tuple(fisher[f"{name}.weight"].shape)
            for name in modules
            if tuple(fisher[f"{name}.weight"].shape) != shapes[name]
        }
        if wrong:
            raise ValueError(f"fisher tensors {wrong} do not have the shape of their weights")
    ranks = _check_ranks(shapes, budget)
    run_device = resolve_device(device)

    names = list(modules)
    # Half-precision weights are factorized in float32; float64 ones keep their precision.
    dtypes = {
        name: torch.float64 if modules[name].weight.dtype == torch.float64 else torch.float32
        for name in names
    }
    weights = [modules[name].weight.detach().to(run_device, dtypes[name]) for name in names]
    importances = [
        None if fisher is None else fisher[f"{name}.weight"].detach().to(run_device, dtypes[name])
        for name in names
    ]
    rank_list = [ranks[name] for name in names]
    started = time.perf_counter()
    results = factorize_batch(weights, importances, rank_list, solver=solver, **solver_options)
    total_seconds = time.perf_counter() - started
    # factorize_batch times each group of same-(shape, rank) layers together; a layer's share is
    # its group's time divided by the group size.
    group_sizes: dict[tuple[tuple[int, int], int], int] = {}
    for name in names:
        group_sizes[(shapes[name], ranks[name])] = (
            group_sizes.get((shapes[name], ranks[name]), 0) + 1
        )
    if len(results) != len(names):
        raise ValueError(
            f"solver {solver!r} returned {len(results)} results for {len(names)} layers"
        )
    if solver == "svd":
        svd_losses = [result.loss for result in results]
    else:
        svd_losses = [
            result.loss for result in factorize_batch(weights, importances, rank_list, solver="svd")
        ]

    compressed = copy.deepcopy(model)
    report = []
    for name, result, svd_loss in zip(names, results, svd_losses, strict=True):
        dense = modules[name]
        out_features, in_features = shapes[name]
        rank = ranks[name]
        if tuple(result.left.shape) != (out_features, rank) or tuple(result.right.shape) != (
            rank,
            in_features,
        ):
            raise ValueError(
                f"solver {solver!r} returned factors {tuple(result.left.shape)} @ {tuple(result.right.shape)} "
                f"for layer {name!r}; expected ({out_features}, {rank}) @ ({rank}, {in_features})"
            )
        weight = dense.weight
        layer = LowRankLinear.from_factors(
            result.left.detach().to(weight.device, weight.dtype),
            result.right.detach().to(weight.device, weight.dtype),
            None if dense.bias is None else dense.bias.detach().clone(),
        )
        layer.train(dense.training)
        _set_submodule(compressed, name, layer)
        bias_params = 0 if dense.bias is None else out_features
        report.append(
            {
                "module": name,
                "shape": f"{out_features}x{in_features}",
                "out_features": out_features,
                "in_features": in_features,
                "rank": rank,
                "params_before": out_features * in_features + bias_params,
                "params_after": rank * (out_features + in_features) + bias_params,
                "weighted_loss": float(result.loss),
                "svd_loss": float(svd_loss),
                "loss_rel_svd": relative_loss(float(result.loss), float(svd_loss)),
                "initial_loss": float(result.initial_loss),
                "seconds": float(result.seconds) / group_sizes[(shapes[name], rank)],
                "total_seconds": total_seconds,
                "iterations": int(result.iterations),
                "solver": solver,
                "history": json.dumps([[float(s), float(v)] for s, v in result.history]),
                "info": json.dumps(result.info, default=str),
            }
        )
    return compressed, report


def tensors_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict as contiguous CPU tensors, one key per storage.

    Tied parameters (several names for one tensor) are written once; the second return value maps
    each dropped alias to the key it shares its tensor with.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def serialized_size_bytes(model: nn.Module) -> int:
    """Size in bytes of the ``model.safetensors`` that :func:`save_compressed` writes for ``model``."""
    tensors, _ = tensors_for_saving(model)
    return len(save(tensors, metadata=_SAFETENSORS_METADATA))


def parameter_counts(tensors: Mapping[str, torch.Tensor], modules: Iterable[str]) -> dict[str, int]:
    """Count parameters in saved tensors: ``{"layers": under the given modules, "model": all}``.

    A tensor belongs to module ``m`` when its key starts with ``"m."``; counts are element counts of
    the tensors as stored (each tied tensor once).
    """
    prefixes = tuple(f"{name}." for name in modules)
    layers = sum(tensor.numel() for key, tensor in tensors.items() if key.startswith(prefixes))
    return {"layers": int(layers), "model": int(sum(tensor.numel() for tensor in tensors.values()))}


def save_compressed(
    model: PreTrainedModel, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> None:
    """Write ``model`` (with its :class:`LowRankLinear` layers) as an HF-style directory.

    Files: ``config.json``, ``model.safetensors`` (factors under ``<module>.right.weight`` /
    ``<module>.left.weight`` / ``<module>.left.bias``), ``lowrank_config.json`` (model class, dtype,
    every low-rank module with rank/in/out/bias, tied aliases) and the tokenizer files when given.
    """
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
    floating = [tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()]
    config = copy.deepcopy(model.config)
    config.architectures = [class_name]
    config.save_pretrained(directory)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata=_SAFETENSORS_METADATA)
    lowrank_config = {
        "format_version": LOWRANK_FORMAT_VERSION,
        "model_class": class_name,
        "dtype": str(floating[0]).removeprefix("torch.") if floating else "float32",
        "modules": {
            name: {
                "rank": module.rank,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.left.bias is not None,
            }
            for name, module in lowrank_modules(model).items()
        },
        "tied": aliases,
    }
    (directory / LOWRANK_CONFIG_FILE).write_text(json.dumps(lowrank_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def read_lowrank_config(directory: str | Path) -> dict[str, Any]:
    """Parse and check ``lowrank_config.json`` of a compressed model directory."""
    path = Path(directory) / LOWRANK_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; expected a directory written by save_compressed")
    lowrank_config = json.loads(path.read_text())
    version = lowrank_config.get("format_version")
    if version != LOWRANK_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; expected {LOWRANK_FORMAT_VERSION}"
        )
    for key in ("model_class", "dtype", "modules", "tied"):
        if key not in lowrank_config:
            raise ValueError(f"{path} has no {key!r} entry")
    return lowrank_config


def load_compressed(directory: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Rebuild a model written by :func:`save_compressed`; strict about every tensor key.

    The stock transformers class named in ``lowrank_config.json`` is built from ``config.json``,
    the listed modules are replaced by :class:`LowRankLinear` of the saved ranks and
    ``model.safetensors`` is loaded; a missing or unexpected key raises ``ValueError``.
    Returns the model in eval mode on ``device``.
    """
    directory = Path(directory)
    for file_name in ("config.json", WEIGHTS_FILE):
        if not (directory / file_name).is_file():
            raise ValueError(
                f"{directory / file_name} is missing; expected a directory written by save_compressed"
            )
    lowrank_config = read_lowrank_config(directory)
    model_class = getattr(transformers, lowrank_config["model_class"], None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(
            f"{directory / LOWRANK_CONFIG_FILE} names model class {lowrank_config['model_class']!r}, "
            "which is not a transformers PreTrainedModel class"
        )
    dtype = getattr(torch, lowrank_config["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"{directory / LOWRANK_CONFIG_FILE} has an unknown dtype {lowrank_config['dtype']!r}"
        )
    config = AutoConfig.from_pretrained(directory)
    model = model_class(config).to(dtype)
    for name, spec in lowrank_config["modules"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(
                f"low-rank module {name!r} does not exist in {model_class.__name__}"
            ) from exc
        if not isinstance(dense, nn.Linear) or (dense.out_features, dense.in_features) != (
            spec["out_features"],
            spec["in_features"],
        ):
            raise ValueError(
                f"low-rank module {name!r} ({spec['out_features']}x{spec['in_features']}) does not "
                f"replace an nn.Linear of that shape in {model_class.__name__}; found {dense}"
            )
        layer = LowRankLinear(
            spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], dtype=dtype
        )
        _set_submodule(model, name, layer)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    tied = lowrank_config["tied"]
    expected = set(model.state_dict())
    missing = sorted(expected - set(tensors) - set(tied))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match {model_class.__name__} with the low-rank modules of "
            f"{LOWRANK_CONFIG_FILE}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}"
        )
    expected_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    wrong = {
        key: (tuple(tensor.shape), expected_shapes[key])
        for key, tensor in tensors.items()
        if tuple(tensor.shape) != expected_shapes[key]
    }
    if wrong:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} has tensors whose (saved, expected) shapes differ: "
            f"{dict(list(wrong.items())[:5])}; {LOWRANK_CONFIG_FILE} does not match the weights"
        )
    for alias, source in tied.items():
        if alias not in expected or source not in tensors:
            raise ValueError(
                f"tied alias {alias!r} -> {source!r} does not name keys of {model_class.__name__}"
            )
        tensors[alias] = tensors[source]
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model.to(resolve_device(device))
