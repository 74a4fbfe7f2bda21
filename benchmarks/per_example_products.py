"""Per-example squared gradients Σ_n (G_nᵀ X_n)² of one batch: the Fisher pass's kernel and two rewrites.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/per_example_products.py [--repeats 10]

For each of MiniLM's three layer shapes (FFN in 1536 × 384, FFN out 384 × 1536, attention
384 × 384) and one batch of 32 examples of 27 tokens (the default Fisher examples' mean) and 64
(``max_length``), times on random data, median of ``--repeats``:

- ``pass``: what ``lowrank.fisher`` does (the per-example products of as many examples as fit a
  4 MiB workspace in one ``bmm``, each example's square added into the running total);
- ``rows tiled``: tiles of output rows, all examples of the batch per tile, so that the running
  total's tile stays in cache while the examples are added (workspace 4 and 8 MiB);
- ``bf16``: the pass with oneDNN's bfloat16 math for the products
  (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``; float32 in and out).

Every variant is checked against float64 products and its relative error (Frobenius) printed.
Then one Gram matrix XᵀX of 2048 tokens × 1536 (the calibration statistics' largest product) in
float32 and in oneDNN's bfloat16 mode, for comparison with the per-example products.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from weighted_lowrank.lowrank.fisher import (  # noqa: E402
    _CPU_WORKSPACE_ELEMENTS,
    _PerExampleAccumulator,
)

SHAPES = {"FFN in": (1536, 384), "FFN out": (384, 1536), "attention": (384, 384)}
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@functools.cache
def accumulator_for(out_features: int, in_features: int) -> _PerExampleAccumulator:
    """The Fisher pass's accumulator for one layer shape (built once: it allocates its totals)."""
    layer = nn.Linear(in_features, out_features, bias=False, device="meta")
    return _PerExampleAccumulator({"layer": layer}, torch.device("cpu"))


def per_example_blocks(
    gradient: torch.Tensor, activation: torch.Tensor, total: torch.Tensor, workspace: torch.Tensor
) -> None:
    """The pass's own kernel, ``fisher._PerExampleAccumulator``, with ``workspace``."""
    accumulator = accumulator_for(*total.shape)
    accumulator.workspace = workspace
    every_token = torch.ones(gradient.shape[1], dtype=torch.bool)
    accumulator._add_squared_per_example(gradient, activation, every_token, total)


def row_tiles(
    gradient: torch.Tensor, activation: torch.Tensor, total: torch.Tensor, workspace: torch.Tensor
) -> None:
    """All examples of the batch for one tile of output rows at a time."""
    batch, _, out_features = gradient.shape
    in_features = activation.shape[2]
    tile = max(1, workspace.numel() // (batch * in_features))
    transposed = gradient.transpose(1, 2)
    for start in range(0, out_features, tile):
        stop = min(out_features, start + tile)
        products = workspace[: batch * (stop - start) * in_features].view(
            batch, stop - start, in_features
        )
        torch.bmm(transposed[:, start:stop], activation, out=products)
        total[start:stop] += products.square_().sum(dim=0)


@contextmanager
def bf16_matmul():
    """float32 matrix products computed by oneDNN in bfloat16 (float32 accumulation and result)."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def in_bf16(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with oneDNN's bfloat16 math for float32 products."""

    def run(*args: Any) -> Any:
        with bf16_matmul():
            return function(*args)

    return run


VARIANTS: dict[str, tuple[Kernel, int]] = {
    "pass": (per_example_blocks, _CPU_WORKSPACE_ELEMENTS),
    "rows tiled, 4 MiB": (row_tiles, _CPU_WORKSPACE_ELEMENTS),
    "rows tiled, 8 MiB": (row_tiles, 2 * _CPU_WORKSPACE_ELEMENTS),
    "bf16": (in_bf16(per_example_blocks), _CPU_WORKSPACE_ELEMENTS),
}


def time_ms(function: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``function()`` after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gram_table(repeats: int, generator: torch.Generator) -> None:
    """One 2048 × 1536 Gram in float32 and in bfloat16 mode."""
    rows = torch.randn(2048, 1536, generator=generator)
    exact = rows.double().t() @ rows.double()
    print("\n| Gram 2048 × 1536 | median ms | relative error |\n|---|---:|---:|")
    for name, product in (
        ("float32", lambda: rows.t() @ rows),
        ("bf16", in_bf16(lambda: rows.t() @ rows)),
    ):
        error = float((product().double() - exact).norm() / exact.norm())
        print(f"| {name} | {time_ms(product, repeats):.2f} | {error:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--tokens", default="27,64", help="comma-separated tokens per example")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| tokens | layer | variant | median ms | × pass | relative error |")
    print("|---|---|---|---:|---:|---:|")
    for tokens in (int(value) for value in args.tokens.split(",")):
        for layer, (out_features, in_features) in SHAPES.items():
            gradient = torch.randn(args.examples, tokens, out_features, generator=generator)
            activation = torch.randn(args.examples, tokens, in_features, generator=generator)
            exact = (
                torch.einsum("nto,nti->noi", gradient.double(), activation.double()).square().sum(0)
            )
            baseline = None
            for name, (kernel, elements) in VARIANTS.items():
                workspace = torch.empty(max(elements, out_features * in_features))
                total = torch.zeros(out_features, in_features)
                kernel(gradient, activation, total, workspace)
                error = float((total.double() - exact).norm() / exact.norm())
                call = functools.partial(kernel, gradient, activation, total, workspace)
                median = time_ms(call, args.repeats)
                baseline = baseline or median
                print(
                    f"| {tokens} | {layer} | {name} | {median:.2f} | {median / baseline:.2f} "
                    f"| {error:.1e} |"
                )
    gram_table(args.repeats, generator)


if __name__ == "__main__":
    main()
