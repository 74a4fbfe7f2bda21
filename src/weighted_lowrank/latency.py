"""CPU latency of forward passes, timed the same way for every model (plain torch, no Kedro)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn


def measure_latency_ms(
    models: Mapping[str, nn.Module],
    vocab_size: int,
    batch_size: int,
    sequence_length: int,
    repeats: int,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Median CPU milliseconds of one forward pass per model, on the same random full-length batch.

    The models are timed in turns within each repeat so that load from other processes on a
    shared machine hits them alike. ``threads`` sets torch's intra-op threads for the measurement.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(
            0, vocab_size, (batch_size, sequence_length), generator=generator
        ),
        "attention_mask": torch.ones(batch_size, sequence_length, dtype=torch.long),
    }
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    timings: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for model in models.values():
                model.eval()
                for _ in range(warmup):
                    model(**inputs)
            for _ in range(repeats):
                for name, model in models.items():
                    started = time.perf_counter()
                    model(**inputs)
                    timings[name].append((time.perf_counter() - started) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
    return {name: statistics.median(values) for name, values in timings.items()}
