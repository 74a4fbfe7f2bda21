"""Wall time of each closed form on all targeted layers of the latest fine-tuned model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/closed_form_timing.py [--budget 0.5] [--repeats 3]

Loads the latest ``fine_tuned_model``, ``fisher_information`` and ``calibration_statistics`` (a
default ``kedro run`` makes them) and prints the median over ``repeats`` of ``factorize_model``
per solver (issue 12's target: ≤ 3 s for all 36 MiniLM layers on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from project_catalog import load_calibrated, project_catalog  # benchmarks/ is the script directory

from weighted_lowrank.lowrank.compression import factorize_model

SOLVERS = ("svd", "fwsvd", "kfwsvd", "svd_llm", "asvd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    calibrated = load_calibrated(project_catalog())
    model, fisher, names = calibrated.model, calibrated.fisher, calibrated.names
    statistics_tensors = calibrated.statistics
    print(f"torch threads: {torch.get_num_threads()}, layers: {len(names)}")
    print("| solver | median s | runs (s) |\n|---|---|---|")
    for solver in SOLVERS:
        seconds = []
        for _ in range(arguments.repeats):
            started = time.perf_counter()
            factorize_model(
                model, fisher, arguments.budget, solver, names, statistics=statistics_tensors
            )
            seconds.append(time.perf_counter() - started)
        runs = ", ".join(f"{value:.2f}" for value in seconds)
        print(f"| {solver} | {statistics.median(seconds):.2f} | {runs} |", flush=True)


if __name__ == "__main__":
    main()
