"""Batched symmetric eigensolves on CPU: torch threads × float64/float32 × eigvalsh/eigh/svdvals.

    python benchmarks/eigensolve_threads.py                          # default OpenMP wait policy
    OMP_WAIT_POLICY=PASSIVE python benchmarks/eigensolve_threads.py  # as the sweep scripts run

24 random symmetric 384 × 384 matrices (the shape of MiniLM's attention Grams), one warm-up call,
then one timed call per variant. Why ``lowrank.devices.batched_eigvalsh`` / ``batched_eigh`` run
each LAPACK call on one thread (split between worker threads under PASSIVE): a CPU batch is one LAPACK call per matrix, and with more threads each call pays a
fork/join — ruinous when idle threads sleep (PASSIVE) or the cores are busy.
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    print("| threads | dtype | function | seconds |\n|---|---|---|---|")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for dtype in (torch.float64, torch.float32):
            matrices = torch.randn(
                24, 384, 384, dtype=dtype, generator=torch.Generator().manual_seed(0)
            )
            matrices = matrices @ matrices.mT
            for name in ("eigvalsh", "eigh", "svdvals"):
                function = getattr(torch.linalg, name)
                function(matrices[:2])
                started = time.perf_counter()
                function(matrices)
                seconds = time.perf_counter() - started
                print(
                    f"| {threads} | {str(dtype).removeprefix('torch.')} | {name} | {seconds:.3f} |"
                )


if __name__ == "__main__":
    main()
