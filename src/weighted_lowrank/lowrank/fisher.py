"""Empirical Fisher information of Linear weights: exact per-example, or squared minibatch gradients.

Per-example mode: forward hooks keep each targeted Linear's input ``X`` and output ``Y``; one
``autograd.grad`` of the batch-summed loss gives ``G = ∂loss/∂Y``, whose row ``n`` is example
``n``'s own, so the Fisher accumulates ``Σ_n (G_nᵀ X_n)²`` without any weight-gradient product.
The same pass can accumulate the statistics of :mod:`~weighted_lowrank.lowrank.calibration`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from weighted_lowrank.lowrank.calibration import (
    CALIBRATION_STATISTICS,
    StatisticsAccumulator,
    check_statistics,
)
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.language_model import is_causal_lm, summed_block_loss
from weighted_lowrank.lowrank.targets import select_linear_modules

FISHER_MODES = ("per_example", "minibatch")

#: Float32 scratch for a block of per-example gradients: on CPU 4 MiB stay in cache while each
#: square is added (as cheap as the GEMM they replace); on CUDA larger blocks amortise launches.
_CPU_WORKSPACE_ELEMENTS = 1 << 20
_CUDA_WORKSPACE_ELEMENTS = 1 << 26
#: Batches summed in float32 before the float64 sums (≤ 8 × batch-size squares: error ~1e-7).
_FLUSH_BATCHES = 8


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` found: the diagonal Fisher summed over examples, the statistics,
    N, the real tokens, each module's ``T`` and the seconds spent on the statistics."""

    fisher: dict[str, torch.Tensor]
    statistics: dict[str, torch.Tensor]
    num_examples: int
    num_tokens: int
    module_tokens: dict[str, int] = field(default_factory=dict)
    statistics_seconds: float = 0.0


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: str | Iterable[str] | None = None,
    mode: str = "per_example",
    statistics: Iterable[str] = CALIBRATION_STATISTICS,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Calibration:
    """One pass over ``batches`` (``model(**batch)`` inputs with ``"labels"``): the Fisher of the
    ``targets`` Linear weights and the calibration ``statistics``, with the task loss as Hugging
    Face's heads choose it. ``per_example``: ``F = Σ_n (∇_W ℓ_n)²``; ``minibatch``:
    ``F = Σ_b (∇_W Σ_{n∈b} ℓ_n)²``, the same in expectation at a converged model."""
    if mode not in FISHER_MODES:
        raise ValueError(f"mode {mode!r} is not a Fisher mode; expected one of {FISHER_MODES}")
    wanted = check_statistics(statistics)
    modules = select_linear_modules(model, targets)
    target_device = resolve_device(device)
    with _prepared(model, modules, target_device):
        calibration_pass = _Pass(model, modules, mode, wanted, target_device)
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"Fisher ({mode})", unit="batch")
        with calibration_pass.capturing():
            for batch_index, batch in enumerate(iterator):
                calibration_pass.step(batch, batch_index)
    if calibration_pass.examples == 0:
        raise ValueError("batches yielded no examples; expected at least one batch")
    return calibration_pass.result()


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: str | Iterable[str] | None = None,
    mode: str = "per_example",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`calibrate`'s Fisher alone: ``{"<module>.weight": float32 CPU tensor}``."""
    return calibrate(model, batches, targets, mode, (), device, progress).fisher


def validate_fisher(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor],
    targets: str | Iterable[str] | None = None,
) -> dict[str, nn.Linear]:
    """``{module: Linear}`` of ``fisher``'s keys, each a finite ≥ 0 weight of ``model``."""
    if not fisher:
        raise ValueError("Fisher information is empty; expected one tensor per targeted weight")
    linear = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    modules = {key: key.removesuffix(".weight") for key in fisher}
    unknown = [key for key, name in modules.items() if key == name or name not in linear]
    if unknown:
        raise ValueError(
            f"Fisher keys {unknown[:5]} are not '<Linear module>.weight' of this model "
            f"(e.g. {sorted(linear)[:3]}); was it estimated on another model?"
        )
    if targets is not None:
        missing = [
            f"{name}.weight"
            for name in select_linear_modules(model, targets)
            if f"{name}.weight" not in fisher
        ]
        if missing:
            raise ValueError(
                f"Fisher information lacks targeted weights {missing[:5]} ({len(missing)} missing)"
            )
    for key, tensor in fisher.items():
        shape = tuple(linear[modules[key]].weight.shape)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"Fisher tensor {key} has shape {tuple(tensor.shape)}, but the model's weight is "
                f"{shape}"
            )
        if not torch.isfinite(tensor).all() or (tensor < 0).any():
            raise ValueError(
                f"Fisher tensor {key} holds NaN, inf or negative entries; expected finite values ≥ 0"
            )
    return {name: linear[name] for name in modules.values()}


def _loss_function(model: nn.Module):
    """Summed task loss of logits vs labels, chosen like Hugging Face's heads."""
    if is_causal_lm(model):
        return summed_block_loss
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "multi_label_classification":
        return lambda logits, labels: functional.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="sum"
        )
    if problem_type == "regression" or num_labels == 1:
        return lambda logits, labels: functional.mse_loss(
            logits.reshape(labels.shape[0], -1).squeeze(-1),
            labels.to(logits.dtype),
            reduction="sum",
        )
    return lambda logits, labels: functional.cross_entropy(logits, labels.long(), reduction="sum")


def _prepare_batch(
    batch: Mapping[str, torch.Tensor], batch_index: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Move a batch to ``device``, split off labels, and drop all-padding trailing columns."""
    if "labels" not in batch:
        raise ValueError(f"batch {batch_index} has no 'labels' (keys: {sorted(batch)})")
    inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
    labels = batch["labels"].to(device)
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        real_columns = mask.any(dim=0).nonzero()
        length = int(real_columns.max()) + 1 if real_columns.numel() else mask.shape[1]
        if length < mask.shape[1]:
            # Trailing columns that are padding in every row change no real token's output.
            width = mask.shape[1]
            inputs = {
                key: value[:, :length]
                if value.dim() >= 2 and value.shape[:2] == (mask.shape[0], width)
                else value
                for key, value in inputs.items()
            }
            if labels.shape == (mask.shape[0], width):  # a language model's token labels
                labels = labels[:, :length]
    return inputs, labels


@contextmanager
def _prepared(model: nn.Module, modules: dict[str, nn.Linear], device: torch.device):
    """The model on ``device`` in eval mode with targeted weights requiring grad; then restored."""
    first = next(model.parameters(), None)
    original_device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    weight_flags = {name: module.weight.requires_grad for name, module in modules.items()}
    try:
        model.to(device)
        model.eval()
        for module in modules.values():
            module.weight.requires_grad_(True)
        yield
    finally:
        for name, module in modules.items():
            module.weight.requires_grad_(weight_flags[name])
        model.train(was_training)
        model.to(original_device)


class _Pass:
    """State of one calibration pass: Fisher sums, statistics, and what the hooks captured."""

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Linear],
        mode: str,
        statistics: tuple[str, ...],
        device: torch.device,
    ) -> None:
        self.model = model
        self.modules = modules
        self.loss_of = _loss_function(model)
        self.sums = {
            name: torch.zeros(module.weight.shape, dtype=torch.float64, device=device)
            for name, module in modules.items()
        }
        self.per_example = (
            _PerExampleAccumulator(modules, device) if mode == "per_example" else None
        )
        self.statistics = StatisticsAccumulator(modules, statistics, device) if statistics else None
        self.output_gradients = self.per_example is not None or bool(
            self.statistics and self.statistics.needs_output_gradients
        )
        self.captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.device = device
        self.examples = 0
        self.tokens = 0
        # A module called on an input every example shares (DeBERTa-v3's relative positions) has
        # a batch-summed output gradient: from then on batches run one example at a time.
        self.one_example_at_a_time = False

    @contextmanager
    def capturing(self):
        """Forward hooks that hold each targeted module's input and output (when needed)."""
        handles = []
        if self.per_example is not None or self.statistics is not None:
            handles = [
                module.register_forward_hook(_capture_hook(name, self.captured))
                for name, module in self.modules.items()
            ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.captured.clear()

    def step(self, batch: Mapping[str, torch.Tensor], batch_index: int) -> None:
        if self.one_example_at_a_time:
            for example in _single_examples(batch):
                self._step(example, batch_index)
            return
        self._step(batch, batch_index)

    def _step(self, batch: Mapping[str, torch.Tensor], batch_index: int) -> None:
        inputs, labels = _prepare_batch(batch, batch_index, self.device)
        self.captured.clear()
        with torch.enable_grad():
            loss = self.loss_of(self.model(**inputs).logits, labels)
            if self.per_example is not None and _has_shared_call(self.captured, labels.shape[0]):
                del loss
                self.captured.clear()
                self.one_example_at_a_time = True
                self.step(batch, batch_index)
                return
            if not torch.isfinite(loss):
                raise ValueError(
                    f"loss is {loss.item()} on batch {batch_index}; "
                    "check the model weights and labels for NaN/inf"
                )
            weight_grads, output_grads = self._gradients(loss)
        # Non-zero output-gradient rows, asked once (NaN counts as non-zero: it is reported).
        live_rows = {
            name: [g.reshape(-1, g.shape[-1]).any(dim=1) for g in grads]
            for name, grads in output_grads.items()
        }
        if self.per_example is not None:
            self.per_example.accumulate(
                self.captured, output_grads, live_rows, self.sums, batch_index
            )
        else:
            _add_minibatch(weight_grads, self.sums, batch_index)
        mask = inputs.get("attention_mask")
        if self.statistics is not None:
            activations = {name: [x for x, _ in calls] for name, calls in self.captured.items()}
            self.statistics.add(activations, output_grads, mask, labels.shape[0], live_rows)
        self.captured.clear()
        self.examples += labels.shape[0]
        if mask is not None:  # real tokens; without a mask every input_ids position
            self.tokens += int(mask.count_nonzero())
        elif "input_ids" in inputs:
            self.tokens += inputs["input_ids"].numel()

    def _gradients(
        self, loss: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor | None], dict[str, list[torch.Tensor]]]:
        """One ``autograd.grad``: weight gradients (minibatch) and/or the outputs' gradients."""
        if self.per_example is not None:
            unused = [name for name in self.modules if name not in self.captured]
            if unused:
                raise ValueError(
                    f"targeted modules {unused[:5]} were not called in the forward pass"
                )
        weights = (
            [module.weight for module in self.modules.values()] if self.per_example is None else []
        )
        outputs = []
        if self.output_gradients:
            outputs = [
                (name, output) for name in self.modules for _, output in self.captured.get(name, ())
            ]
        gradients = torch.autograd.grad(
            loss, weights + [output for _, output in outputs], allow_unused=True
        )
        weight_grads = dict(zip(self.modules, gradients[: len(weights)], strict=False))
        output_grads: dict[str, list[torch.Tensor]] = {}
        for (name, output), gradient in zip(outputs, gradients[len(weights) :], strict=True):
            output_grads.setdefault(name, []).append(
                torch.zeros_like(output) if gradient is None else gradient
            )
        return weight_grads, output_grads

    def result(self) -> Calibration:
        if self.per_example is not None:
            self.per_example.flush(self.sums)
        fisher = {
            f"{name}.weight": total.to("cpu", torch.float32) for name, total in self.sums.items()
        }
        if self.statistics is None:
            return Calibration(fisher, {}, self.examples, self.tokens)
        statistics, tokens = self.statistics.result()
        seconds = self.statistics.seconds
        return Calibration(fisher, statistics, self.examples, self.tokens, tokens, seconds)


def _has_shared_call(
    captured: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]], batch_size: int
) -> bool:
    """Whether a module saw an input without the batch's leading dimension (several examples)."""
    return batch_size > 1 and any(
        x.dim() >= 2 and x.shape[0] != batch_size for calls in captured.values() for x, _ in calls
    )


def _single_examples(batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into batches of one example."""
    size = batch["labels"].shape[0]
    return [
        {
            key: value[index : index + 1]
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == size
            else value
            for key, value in batch.items()
        }
        for index in range(size)
    ]


def _capture_hook(name: str, captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.setdefault(name, []).append((args[0].detach(), output))

    return hook


class _PerExampleAccumulator:
    """Adds ``Σ_n (G_nᵀ X_n)²`` to float32 totals in buffers allocated once."""

    def __init__(self, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.modules = modules
        self.on_cuda = device.type == "cuda"
        elements = _CUDA_WORKSPACE_ELEMENTS if self.on_cuda else _CPU_WORKSPACE_ELEMENTS
        largest = max(module.weight.numel() for module in modules.values())
        self.workspace = torch.empty(max(elements, largest), dtype=torch.float32, device=device)
        self.totals = {
            name: torch.zeros(module.weight.shape, dtype=torch.float32, device=device)
            for name, module in modules.items()
        }
        self.pending = 0

    def accumulate(
        self,
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        output_grads: dict[str, list[torch.Tensor]],
        live_rows: dict[str, list[torch.Tensor]],
        sums: dict[str, torch.Tensor],
        batch_index: int,
    ) -> None:
        non_finite = []
        for name, module in self.modules.items():
            calls = captured[name]
            activations = [x.reshape(x.shape[0], -1, module.in_features) for x, _ in calls]
            gradients = [
                g.reshape(x.shape[0], -1, module.out_features)
                for (x, _), g in zip(calls, output_grads[name], strict=True)
            ]
            # Several calls of one module add up per example: concatenate along the token axis.
            activation = activations[0] if len(calls) == 1 else torch.cat(activations, dim=1)
            output_grad = gradients[0] if len(calls) == 1 else torch.cat(gradients, dim=1)
            live = torch.cat(
                [
                    rows.view(x.shape[0], -1)
                    for (x, _), rows in zip(calls, live_rows[name], strict=True)
                ],
                dim=1,
            ).any(dim=0)
            total = self.totals[name]
            self._add_squared_per_example(output_grad.float(), activation.float(), live, total)
            # NaN and inf stay in the running total: the first batch that brings one is named.
            if not torch.isfinite(total.sum()):
                non_finite.append(name)
        _raise_if_non_finite(non_finite, "per-example", batch_index)
        self.pending += 1
        if self.pending >= _FLUSH_BATCHES:
            self.flush(sums)

    def flush(self, sums: dict[str, torch.Tensor]) -> None:
        """Add the float32 totals into the float64 ``sums`` and start them again."""
        if self.pending:
            for name, total in self.totals.items():
                sums[name] += total
                total.zero_()
            self.pending = 0

    def _add_squared_per_example(
        self,
        output_grad: torch.Tensor,
        activation: torch.Tensor,
        live: torch.Tensor,
        total: torch.Tensor,
    ) -> None:
        """``total += Σ_n (G_nᵀ X_n)²`` over the ``live`` positions only."""
        if not bool(live.all()):
            positions = live.nonzero().squeeze(1)
            output_grad, activation = output_grad[:, positions], activation[:, positions]
        batch_size, tokens, out_features = output_grad.shape
        in_features = activation.shape[2]
        if tokens == 0:
            return
        if tokens == 1:
            # Rank-one per-example gradients: Σ_n (g_n x_nᵀ)² = (G²)ᵀ(X²), one GEMM, nothing materialised.
            total.addmm_(output_grad[:, 0].square().t(), activation[:, 0].square())
            return
        block = max(1, self.workspace.numel() // (out_features * in_features))
        grads_t = output_grad.transpose(1, 2)
        for start in range(0, batch_size, block):
            count = min(block, batch_size - start)
            products = self.workspace[: count * out_features * in_features]
            products = products.view(count, out_features, in_features)
            torch.bmm(
                grads_t[start : start + count], activation[start : start + count], out=products
            )
            if self.on_cuda:
                total.add_(products.square_().sum(dim=0))
            else:
                for product in products:
                    total.addcmul_(product, product)


def _add_minibatch(
    weight_grads: dict[str, torch.Tensor | None],
    sums: dict[str, torch.Tensor],
    batch_index: int,
) -> None:
    non_finite = []
    for name, gradient in weight_grads.items():
        if gradient is None:
            continue
        squared = gradient.double().square()
        if not torch.isfinite(squared.sum()):
            non_finite.append(name)
        sums[name] += squared
    _raise_if_non_finite(non_finite, "minibatch", batch_index)


def _raise_if_non_finite(non_finite: list[str], kind: str, batch_index: int) -> None:
    """Name the module nearest the loss (last in model order) whose gradient is not finite."""
    if non_finite:
        raise ValueError(
            f"non-finite {kind} gradient of {non_finite[-1]}.weight on batch {batch_index} "
            f"(the targeted module nearest the loss; {len(non_finite)} targeted modules affected)"
        )
