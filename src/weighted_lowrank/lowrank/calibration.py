"""Calibration statistics of a targeted Linear layer ``y = W x`` seen on ``N`` examples with
``T`` real (non-padding) tokens in all:

- ``input_moment``   A = (1/T) Σ_tokens x xᵀ          (in × in), the mean input second moment;
- ``output_moment``  G = (1/N) Σ_n Σ_t g_nt g_ntᵀ     (out × out), g_nt = ∂ℓ_n/∂y at token t;
- ``input_abs_mean`` (1/T) Σ_tokens |x|                (in,), ASVD's activation scale.

With these ``½ tr(ΔWᵀ G ΔW A)`` is the Kronecker-factored (K-FAC "expand") task-loss increase in
nats per example. Stored as ``"<module>.<statistic>"`` float32 tensors.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

#: Every calibration statistic, in storage order.
CALIBRATION_STATISTICS: tuple[str, ...] = ("input_moment", "output_moment", "input_abs_mean")

_INPUT_STATISTICS = ("input_moment", "input_abs_mean")

#: The normalisation in words, as stored beside the statistics.
NORMALISATION = (
    "input_moment = (1/T) sum over real tokens of x x^T; input_abs_mean = (1/T) sum of |x|; "
    "output_moment = (1/N) sum over examples n and tokens t of g g^T, g = d loss_n / d y_nt; "
    "T = num_tokens (non-padding tokens the module saw), N = num_examples"
)

#: Float32 products summed before they go into the float64 totals (flushing every product costs
#: ~10 % of the product on CPU; a few more float32 sums cost no accuracy that matters).
_FLUSH_EVERY = 8

#: Below this fraction of non-zero output-gradient rows the zero rows are copied out before the
#: product (a classifier's last layer); above it multiplying the zeros is cheaper.
_LIVE_FRACTION_TO_COPY = 0.9


def statistic_key(module: str, statistic: str) -> str:
    """The storage key of ``statistic`` of ``module``: ``"<module>.<statistic>"``."""
    if statistic not in CALIBRATION_STATISTICS:
        raise ValueError(
            f"unknown calibration statistic {statistic!r}; expected one of {CALIBRATION_STATISTICS}"
        )
    return f"{module}.{statistic}"


def check_statistics(statistics: Iterable[str]) -> tuple[str, ...]:
    """``statistics`` as a tuple, each a known statistic named once; ``ValueError`` naming the rest."""
    if isinstance(statistics, str):
        raise ValueError(
            f"statistics must be a list of names, got the string {statistics!r}; "
            f"write [{statistics!r}]"
        )
    names = tuple(statistics)
    unknown = [name for name in names if name not in CALIBRATION_STATISTICS]
    if unknown:
        raise ValueError(
            f"unknown calibration statistics {unknown}; expected names from {CALIBRATION_STATISTICS}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"calibration statistics {repeated} are listed more than once")
    return names


class StatisticsAccumulator:
    """Sums of the statistics over one pass, then their means. Inputs matching the attention
    mask count real tokens only; modules fed one input tensor (BERT's query, key, value) share
    one sum, re-checked every batch."""

    def __init__(
        self,
        modules: Mapping[str, nn.Linear],
        statistics: Iterable[str],
        device: torch.device,
        flush_every: int = _FLUSH_EVERY,
    ) -> None:
        self.statistics = check_statistics(statistics)
        self.modules = dict(modules)
        self.device = device
        self.flush_every = flush_every
        self.examples = 0
        self.seconds = 0.0
        self._slot_of: dict[str, _InputSums] = {}
        self._scratch = _Scratch(device)
        self._output_moments = {
            name: _Gram(module.out_features, device, flush_every)
            for name, module in self.modules.items()
            if "output_moment" in self.statistics
        }

    @property
    def needs_inputs(self) -> bool:
        return any(name in _INPUT_STATISTICS for name in self.statistics)

    @property
    def needs_output_gradients(self) -> bool:
        return "output_moment" in self.statistics

    def add(
        self,
        inputs: Mapping[str, list[torch.Tensor]],
        output_gradients: Mapping[str, list[torch.Tensor]],
        attention_mask: torch.Tensor | None,
        examples: int,
        live_rows: Mapping[str, list[torch.Tensor]] | None = None,
    ) -> None:
        """Add one batch (``live_rows``: the non-zero rows of each gradient, when known)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        if self.needs_inputs:
            self._add_inputs(inputs, attention_mask)
        for name, gram in self._output_moments.items():
            lives = live_rows.get(name) if live_rows is not None else None
            for position, gradient in enumerate(output_gradients.get(name, ())):
                rows = gradient.detach().reshape(-1, gradient.shape[-1]).to(torch.float32)
                # NaN counts as non-zero and reaches the sum.
                live = lives[position] if lives is not None else rows.any(dim=1)
                count = int(live.count_nonzero())
                if count < _LIVE_FRACTION_TO_COPY * rows.shape[0]:
                    rows = self._scratch.select(rows, live.nonzero().squeeze(1))
                gram.add(rows)
        self.examples += examples
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - started

    def result(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """``({"<module>.<statistic>": float32 CPU tensor}, {module: T})`` in storage order."""
        means: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            slot = self._slot_of.get(name)
            for statistic in (item for item in CALIBRATION_STATISTICS if item in self.statistics):
                if statistic == "output_moment":
                    total, count = self._output_moments[name].total(), self.examples
                elif slot is None:
                    size = module.in_features
                    shape = (size, size) if statistic == "input_moment" else (size,)
                    total, count = torch.zeros(shape), 0
                else:
                    total = slot.moment.total() if statistic == "input_moment" else slot.abs_sum
                    count = slot.tokens
                means[statistic_key(name, statistic)] = (total / max(count, 1)).to(
                    "cpu", torch.float32
                )
        if not self.needs_inputs:
            return means, {}
        return means, {name: getattr(self._slot_of.get(name), "tokens", 0) for name in self.modules}

    def _add_inputs(
        self, inputs: Mapping[str, list[torch.Tensor]], attention_mask: torch.Tensor | None
    ) -> None:
        real = _RealTokens(attention_mask, self._scratch)
        # Modules whose calls received the very same tensors form one group for this batch.
        groups: dict[tuple[int, ...], list[str]] = {}
        for name in self.modules:
            calls = inputs.get(name)
            if calls:
                groups.setdefault(tuple(_identity(x) for x in calls), []).append(name)
        for names in groups.values():
            slots = self._slots_for(names)
            for x in inputs[names[0]]:
                rows = real.rows(x)
                for slot in slots:
                    slot.add(rows)

    def _slots_for(self, names: list[str]) -> list[_InputSums]:
        """The distinct sums this batch's group ``names`` adds to, unsharing where it must."""
        group = set(names)
        for name in names:
            slot = self._slot_of.get(name)
            if slot is not None and not slot.members <= group:
                # The slot is shared with a module outside this batch's group: split it off.
                moved = slot.members & group
                split = copy.deepcopy(slot)
                split.members = moved
                slot.members -= moved
                for member in moved:
                    self._slot_of[member] = split
        fresh = [name for name in names if name not in self._slot_of]
        if fresh:
            size = self.modules[fresh[0]].in_features
            slot = _InputSums(size, set(fresh), self.statistics, self.device, self.flush_every)
            for name in fresh:
                self._slot_of[name] = slot
        slots = {id(self._slot_of[name]): self._slot_of[name] for name in names}
        return list(slots.values())


class _InputSums:
    """Token count, Σ x xᵀ and Σ |x| of the inputs one or more modules share."""

    def __init__(
        self,
        size: int,
        members: set[str],
        statistics: tuple[str, ...],
        device: torch.device,
        flush_every: int,
    ) -> None:
        self.members = members
        self.tokens = 0
        self.moment = _Gram(size, device, flush_every) if "input_moment" in statistics else None
        self.abs_sum = (
            torch.zeros(size, dtype=torch.float64, device=device)
            if "input_abs_mean" in statistics
            else None
        )

    def add(self, rows: torch.Tensor) -> None:
        self.tokens += rows.shape[0]
        if self.moment is not None:
            self.moment.add(rows)
        if self.abs_sum is not None and rows.shape[0]:
            self.abs_sum += torch.linalg.vector_norm(rows, ord=1, dim=0)


class _Gram:
    """Σ rowsᵀ rows, float32 products into a float64 total; on CPU the lower triangle only."""

    def __init__(self, size: int, device: torch.device, flush_every: int) -> None:
        self.panel = _panel_width(size) if device.type == "cpu" else size
        self.recent = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.sum = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.pending = 0
        self.flush_every = flush_every

    def add(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        size, panel = self.recent.shape[0], self.panel
        for start in range(0, size, panel):
            # Rows start: of the columns start:start+panel, i.e. the lower triangle's panel.
            self.recent[start:, start : start + panel].addmm_(
                rows[:, start:].t(), rows[:, start : start + panel]
            )
        self.pending += 1
        if self.pending >= self.flush_every:
            self._flush()

    def total(self) -> torch.Tensor:
        """The float64 sum, both triangles filled."""
        self._flush()
        if self.panel >= self.sum.shape[0]:
            return self.sum.clone()
        return torch.tril(self.sum) + torch.tril(self.sum, -1).t()

    def _flush(self) -> None:
        if self.pending:
            self.sum += self.recent
            self.recent.zero_()
            self.pending = 0


def _panel_width(size: int) -> int:
    """About eight panels, at least 128 columns wide (narrower ones lose more than they save)."""
    return max(128, -(-size // 8))


class _RealTokens:
    """Picks the rows of a captured input that are real (non-padding) tokens of the batch."""

    def __init__(self, attention_mask: torch.Tensor | None, scratch: _Scratch) -> None:
        self.shape = None
        self.index = None
        self.scratch = scratch
        if attention_mask is not None and attention_mask.dim() == 2:
            self.shape = tuple(attention_mask.shape)
            flat = attention_mask.reshape(-1) != 0
            if not bool(flat.all()):
                self.index = flat.nonzero().squeeze(1)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s real-token float32 rows (all rows if it does not match the mask); valid until
        the next call."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if self.index is not None and x.dim() == 3 and tuple(x.shape[:2]) == self.shape:
            return self.scratch.select(flat, self.index)
        return flat


class _Scratch:
    """One reused buffer for selected rows (fresh ones page-fault as much as the copy)."""

    def __init__(self, device: torch.device) -> None:
        self.buffer = torch.empty(0, dtype=torch.float32, device=device)

    def select(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``rows[index]`` in the buffer (valid until the next call)."""
        count, columns = index.numel(), rows.shape[1]
        if self.buffer.numel() < count * columns:
            self.buffer = torch.empty(count * columns, dtype=torch.float32, device=rows.device)
        out = self.buffer[: count * columns].view(count, columns)
        return torch.index_select(rows, 0, index, out=out)


def _identity(x: torch.Tensor) -> tuple:
    """Equal for views of one tensor (captured tensors live through the batch)."""
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
