"""CPU latency, parameters and file size of SVD-compressed all-MiniLM-L6-v2 against the dense model.

Run ``python benchmarks/latency.py`` (``--help`` for the knobs). Latency does not depend on the
factor values, so plain SVD stands in for every solver: a compressed model's forward pass costs
the same whatever solver produced its factors. For each budget it prints the median over
``--repeats`` forward passes of one random ``batch × length`` batch, the dense model timed in turns
with the compressed one in this process (the evaluation pipeline's protocol), plus parameter
counts and ``model.safetensors`` size computed from the tensors that would be saved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

from weighted_lowrank.hf.latency import measure_latency_ms  # noqa: E402
from weighted_lowrank.hf.models import EMBEDDED_MODEL, load_base_model  # noqa: E402
from weighted_lowrank.lowrank.compression import compress_model  # noqa: E402
from weighted_lowrank.lowrank.layer import lowrank_modules  # noqa: E402
from weighted_lowrank.lowrank.serialization import (  # noqa: E402
    parameter_counts,
    serialized_size_bytes,
    tensors_for_saving,
)

RANDOM_MINILM = "random:all-MiniLM-L6-v2"


def build_model(source: str) -> nn.Module:
    """The model to time; latency depends on shapes only, so random MiniLM-shaped weights do."""
    if source != RANDOM_MINILM:
        return load_base_model(source, num_labels=2).model
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help=f"model source, or {RANDOM_MINILM!r}: MiniLM's shapes with random weights (no files needed)",
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument(
        "--shapes", nargs="+", default=["1x64", "8x64", "32x128"], help="batch x length"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()

    dense = build_model(args.model).eval()
    dense_tensors = tensors_for_saving(dense)[0]
    print(f"# latency benchmark — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command: python benchmarks/latency.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads"
    )
    print()
    print(
        "| budget | batch×length | dense ms | compressed ms | ratio | params layers | "
        "params model | model.safetensors bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    dense_size = serialized_size_bytes(dense)
    for budget in args.budgets:
        compressed, _ = compress_model(dense, None, budget, "svd")
        layers = list(lowrank_modules(compressed))
        counts = parameter_counts(tensors_for_saving(compressed)[0], layers)
        dense_counts = parameter_counts(dense_tensors, layers)
        size = serialized_size_bytes(compressed)
        for shape in args.shapes:
            batch_size, length = (int(part) for part in shape.split("x"))
            timings = measure_latency_ms(
                {"dense": dense, "compressed": compressed},
                dense.config.vocab_size,
                batch_size=batch_size,
                sequence_length=length,
                repeats=args.repeats,
                warmup=args.warmup,
                threads=args.threads,
            )
            print(
                f"| {budget} | {shape} | {timings['dense']:.2f} | {timings['compressed']:.2f} | "
                f"{timings['compressed'] / timings['dense']:.3f} | "
                f"{counts['layers']:,} / {dense_counts['layers']:,} | "
                f"{counts['model']:,} / {dense_counts['model']:,} | {size:,} / {dense_size:,} |"
            )


if __name__ == "__main__":
    main()
