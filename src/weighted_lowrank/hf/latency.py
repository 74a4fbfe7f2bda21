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
    """Median CPU milliseconds of one forward pass per model on one random full-length batch,
    timed in turns within each repeat so that load from other processes hits them alike."""
    shape = (batch_size, sequence_length)
    ids = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(shape, dtype=torch.long)}
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


#: Medians already measured in this process, by (model shape, vocabulary, protocol).
_MEASURED: dict[tuple, float] = {}


def model_shape(model: nn.Module) -> tuple:
    """What a forward pass's cost depends on: the class and every tensor's name, shape, dtype."""
    return (
        type(model).__name__,
        tuple(
            (key, tuple(value.shape), str(value.dtype)) for key, value in model.state_dict().items()
        ),
    )


def latency_by_shape_ms(
    models: Mapping[str, nn.Module], vocab_size: int, **protocol: object
) -> dict[str, float]:
    """:func:`measure_latency_ms`, timing each distinct model shape once per process (equal
    shapes run the same kernels: their differences were noise)."""
    options = tuple(sorted(protocol.items()))
    keys = {name: (model_shape(model), vocab_size, options) for name, model in models.items()}
    first_of: dict[tuple, str] = {}
    for name, key in keys.items():
        if key not in _MEASURED:
            first_of.setdefault(key, name)
    if first_of:
        timings = measure_latency_ms(
            {name: models[name] for name in first_of.values()}, vocab_size, **protocol
        )
        for key, name in first_of.items():
            _MEASURED[key] = timings[name]
    return {name: _MEASURED[key] for name, key in keys.items()}
