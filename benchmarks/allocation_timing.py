"""Wall time of the loss-vs-rank curves and the global allocation on the latest fine-tuned model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/allocation_timing.py [--budget 0.5] [--repeats 3]
        [--loss-model own|kronecker]

Loads the latest ``fine_tuned_model``, ``fisher_information`` and ``calibration_statistics`` (a
default ``kedro run`` makes them) and prints, per curve kind (every solver has its own spectrum
but the element-wise solvers, which share the FWSVD proxy), the median over ``repeats`` of
``model_loss_curves`` on every targeted layer and of ``allocate_ranks`` at ``budget`` (issue 13's
target: curves and allocation for 36 layers ≤ 5 s on 2 cores). Also prints how the global
allocation spends the budget per kind of layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from project_catalog import load_calibrated, project_catalog  # benchmarks/ is the script directory

from weighted_lowrank.lowrank.allocation import allocate_ranks, parameter_budget
from weighted_lowrank.lowrank.compression import model_loss_curves
from weighted_lowrank.lowrank.targets import describe_module

#: One solver per distinct curve (tfwsvd stands for every element-wise solver: the proxy).
SOLVERS = ("svd", "fwsvd", "kfwsvd", "svd_llm", "asvd", "tfwsvd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss-model", default="own", choices=["own", "kronecker"])
    arguments = parser.parse_args()
    catalog = project_catalog()
    calibrated = load_calibrated(catalog)
    model, fisher, names = calibrated.model, calibrated.fisher, calibrated.names
    num_examples, statistics_tensors = calibrated.num_examples, calibrated.statistics
    print(
        f"torch threads: {torch.get_num_threads()}, layers: {len(names)}, "
        f"curves priced by: {arguments.loss_model}"
    )
    print("| solver | curves median s | allocation median s | total s | runs (curves, s) |")
    print("|---|---|---|---|---|")
    kept_by_kind = {}
    for solver in SOLVERS:
        curve_seconds, allocation_seconds = [], []
        for _ in range(arguments.repeats):
            started = time.perf_counter()
            curves = model_loss_curves(
                model,
                fisher,
                solver,
                names,
                num_examples=num_examples,
                loss_model=arguments.loss_model,
                statistics=statistics_tensors,
            )
            curve_seconds.append(time.perf_counter() - started)
            shapes = {name: (c.out_features, c.in_features) for name, c in curves.items()}
            started = time.perf_counter()
            allocation = allocate_ranks(curves, parameter_budget(shapes, arguments.budget))
            allocation_seconds.append(time.perf_counter() - started)
        kept_by_kind[solver] = _kept_by_kind(curves, allocation.ranks)
        curves_median = statistics.median(curve_seconds)
        allocation_median = statistics.median(allocation_seconds)
        runs = ", ".join(f"{value:.2f}" for value in curve_seconds)
        print(
            f"| {solver} | {curves_median:.2f} | {allocation_median:.3f} | "
            f"{curves_median + allocation_median:.2f} | {runs} |",
            flush=True,
        )
    print(
        f"\nKept fraction of each kind's dense parameters, global allocation at {arguments.budget}:"
    )
    kinds = sorted({kind for table in kept_by_kind.values() for kind in table})
    print("| solver | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for solver, table in kept_by_kind.items():
        print(f"| {solver} | " + " | ".join(f"{table.get(kind, 0):.2f}" for kind in kinds) + " |")


def _kept_by_kind(curves, ranks) -> dict[str, float]:
    kept: dict[str, list[int]] = {}
    for name, curve in curves.items():
        _, kind = describe_module(name)
        totals = kept.setdefault(kind, [0, 0])
        totals[0] += curve.parameters(ranks[name])
        totals[1] += curve.out_features * curve.in_features
    return {kind: used / dense for kind, (used, dense) in kept.items()}


if __name__ == "__main__":
    main()
