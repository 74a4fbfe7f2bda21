"""Empirical Fisher information of Linear weights: exact per-example, or squared minibatch gradients.

Per-example mode never forms a per-parameter gradient through autograd. Forward hooks keep each
targeted Linear's input ``X`` (batch, tokens, in) and output ``Y``; one ``torch.autograd.grad`` of
the loss *summed* over the batch returns ``G = ∂loss/∂Y``, whose row ``n`` depends only on example
``n`` (examples do not interact in an eval-mode transformer). Example ``n``'s weight gradient is
then ``G_nᵀ X_n``, and the Fisher accumulates ``Σ_n (G_nᵀ X_n)²``. Asking autograd only for the
outputs' gradients skips every weight-gradient product, so the per-example products replace
rather than add to the backward work of an ordinary minibatch pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional

from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.targets import select_linear_modules

FISHER_MODES = ("per_example", "minibatch")

#: Scratch elements for a block of per-example gradients (float32). On CPU 4 MiB: the block stays
#: in cache while each example's square is added, so the per-example products cost about what the
#: weight-gradient GEMM they replace costs. On CUDA larger blocks amortise kernel launches.
_CPU_WORKSPACE_ELEMENTS = 1 << 20
_CUDA_WORKSPACE_ELEMENTS = 1 << 26


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: str | Iterable[str] | None = None,
    mode: str = "per_example",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Sum over examples of squared gradients of the task loss w.r.t. targeted Linear weights.

    ``batches`` yields dicts accepted by ``model(**batch)`` that also hold ``"labels"``. The loss
    is cross-entropy for classification (``num_labels > 1``), binary cross-entropy with logits for
    ``problem_type == "multi_label_classification"``, and squared error for regression
    (``num_labels == 1``), always *summed* over the examples of a batch.

    ``mode="per_example"``: ``F = Σ_n (∇_W ℓ_n)²`` (exact empirical Fisher).
    ``mode="minibatch"``: ``F = Σ_b (∇_W Σ_{n∈b} ℓ_n)²``; in expectation this equals the
    per-example sum when per-example gradients have zero mean (a converged model), so both modes
    share one scale.

    ``targets`` selects Linear modules (regex or names; ``None`` = attention Q/K/V/O and FFN).
    The model runs in eval mode (no dropout) on ``device``; its mode, device and ``requires_grad``
    flags are restored afterwards. Returns ``{"<module>.weight": float32 CPU tensor}``.
    Raises ``ValueError`` for an unknown mode, a batch without labels, no examples, or a
    non-finite loss or gradient (naming the module nearest the loss whose gradient is not finite).
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode {mode!r} is not a Fisher mode; expected one of {FISHER_MODES}")
    modules = select_linear_modules(model, targets)
    target_device = resolve_device(device)
    loss_of = _loss_function(model)

    parameters = list(model.parameters())
    original_device = parameters[0].device if parameters else torch.device("cpu")
    was_training = model.training
    weight_flags = {name: module.weight.requires_grad for name, module in modules.items()}
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    sums = {}
    examples = 0
    try:
        model.to(target_device)
        model.eval()
        for module in modules.values():
            module.weight.requires_grad_(True)
        sums = {
            name: torch.zeros(module.weight.shape, dtype=torch.float64, device=target_device)
            for name, module in modules.items()
        }
        per_example = None
        if mode == "per_example":
            per_example = _PerExampleAccumulator(modules, target_device)
            handles = [
                module.register_forward_hook(_capture_hook(name, captured))
                for name, module in modules.items()
            ]
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"Fisher ({mode})", unit="batch")
        for batch_index, batch in enumerate(iterator):
            inputs, labels = _prepare_batch(batch, batch_index, target_device)
            captured.clear()
            with torch.enable_grad():
                loss = loss_of(model(**inputs).logits, labels)
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"loss is {loss.item()} on batch {batch_index}; "
                        "check the model weights and labels for NaN/inf"
                    )
                if mode == "per_example":
                    per_example.accumulate(captured, loss, sums, batch_index)
                else:
                    _accumulate_minibatch(modules, loss, sums, batch_index)
            examples += labels.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        captured.clear()
        for name, module in modules.items():
            module.weight.requires_grad_(weight_flags[name])
        model.train(was_training)
        model.to(original_device)
    if examples == 0:
        raise ValueError("batches yielded no examples; expected at least one batch")
    return {f"{name}.weight": total.to("cpu", torch.float32) for name, total in sums.items()}


def validate_fisher(
    model: nn.Module,
    fisher: Mapping[str, torch.Tensor],
    targets: str | Iterable[str] | None = None,
) -> dict[str, nn.Linear]:
    """Check that ``fisher`` fits ``model``; return ``{module name: Linear}`` for its keys.

    Every key must be ``"<Linear module>.weight"`` of the model with the weight's shape, finite
    and non-negative. With ``targets`` given, every targeted module must have an entry.
    Raises ``ValueError`` naming the offending keys.
    """
    if not fisher:
        raise ValueError("Fisher information is empty; expected one tensor per targeted weight")
    linear = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    unknown = [
        key for key in fisher if not key.endswith(".weight") or key[: -len(".weight")] not in linear
    ]
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
    modules = {key[: -len(".weight")]: linear[key[: -len(".weight")]] for key in fisher}
    for name, module in modules.items():
        tensor = fisher[f"{name}.weight"]
        if tuple(tensor.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"Fisher tensor {name}.weight has shape {tuple(tensor.shape)}, "
                f"but the model's weight is {tuple(module.weight.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Fisher tensor {name}.weight holds NaN or inf")
        if (tensor < 0).any():
            raise ValueError(f"Fisher tensor {name}.weight has negative entries; expected ≥ 0")
    return modules


def _loss_function(model: nn.Module):
    """Summed task loss of logits vs labels, chosen like Hugging Face's classification heads."""
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
    return inputs, labels


def _capture_hook(name: str, captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.setdefault(name, []).append((args[0].detach(), output))

    return hook


class _PerExampleAccumulator:
    """Adds ``Σ_n (G_nᵀ X_n)²`` of one batch to the running sums, with reused buffers.

    Buffers are allocated once: fresh multi-megabyte tensors per block would cost a page fault
    per page on every batch, which on CPU is as expensive as the products themselves.
    """

    def __init__(self, modules: dict[str, nn.Linear], device: torch.device) -> None:
        self.modules = modules
        self.on_cuda = device.type == "cuda"
        elements = _CUDA_WORKSPACE_ELEMENTS if self.on_cuda else _CPU_WORKSPACE_ELEMENTS
        largest = max(module.weight.numel() for module in modules.values())
        self.workspace = torch.empty(max(elements, largest), dtype=torch.float32, device=device)
        self.batch_sums = {
            name: torch.zeros(module.weight.shape, dtype=torch.float32, device=device)
            for name, module in modules.items()
        }

    def accumulate(
        self,
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        loss: torch.Tensor,
        sums: dict[str, torch.Tensor],
        batch_index: int,
    ) -> None:
        unused = [name for name in self.modules if name not in captured]
        if unused:
            raise ValueError(f"targeted modules {unused[:5]} were not called in the forward pass")
        outputs = [output for name in self.modules for _, output in captured[name]]
        gradients = iter(torch.autograd.grad(loss, outputs, allow_unused=True))
        non_finite = []
        for name, module in self.modules.items():
            calls = captured[name]
            activations, output_grads = [], []
            for activation, output in calls:
                gradient = next(gradients)
                if gradient is None:
                    gradient = torch.zeros_like(output)
                batch_size = activation.shape[0]
                activations.append(activation.reshape(batch_size, -1, module.in_features))
                output_grads.append(gradient.reshape(batch_size, -1, module.out_features))
            # Several calls of one module add up per example: concatenate along the token axis.
            activation = activations[0] if len(calls) == 1 else torch.cat(activations, dim=1)
            output_grad = output_grads[0] if len(calls) == 1 else torch.cat(output_grads, dim=1)
            batch_sum = self.batch_sums[name]
            batch_sum.zero_()
            self._add_squared_per_example(output_grad.float(), activation.float(), batch_sum)
            if not torch.isfinite(batch_sum.sum()):
                non_finite.append(name)
            sums[name] += batch_sum
        _raise_if_non_finite(non_finite, "per-example", batch_index)

    def _add_squared_per_example(
        self, output_grad: torch.Tensor, activation: torch.Tensor, total: torch.Tensor
    ) -> None:
        """``total += Σ_n (G_nᵀ X_n)²`` for G (batch, tokens, out) and X (batch, tokens, in)."""
        # Token positions whose output gradient is zero in every example add nothing: padding, and
        # in a classifier's last layer every token but the pooled one (query, FFN, output dense).
        live = output_grad.any(dim=0).any(dim=1)  # NaN counts as non-zero: it stays and is reported
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


def _accumulate_minibatch(
    modules: dict[str, nn.Linear],
    loss: torch.Tensor,
    sums: dict[str, torch.Tensor],
    batch_index: int,
) -> None:
    gradients = torch.autograd.grad(
        loss, [module.weight for module in modules.values()], allow_unused=True
    )
    non_finite = []
    for name, gradient in zip(modules, gradients, strict=True):
        if gradient is None:
            continue
        squared = gradient.double().square()
        if not torch.isfinite(squared.sum()):
            non_finite.append(name)
        sums[name] += squared
    _raise_if_non_finite(non_finite, "minibatch", batch_index)


def _raise_if_non_finite(non_finite: list[str], kind: str, batch_index: int) -> None:
    """Name the targeted module nearest the loss (the last in model order) whose gradient broke."""
    if non_finite:
        raise ValueError(
            f"non-finite {kind} gradient of {non_finite[-1]}.weight on batch {batch_index} "
            f"(the targeted module nearest the loss; {len(non_finite)} targeted modules affected)"
        )
