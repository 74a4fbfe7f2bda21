"""Wall time of the layer fan-out to a 2-worker Dask LocalCluster vs the sequential solve.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/dask_overhead.py [--solvers svd,kfwsvd,als]
        [--budget 0.5] [--repeats 3] [--workers 2] [--threads N]

Factorizes every targeted layer of the default model with each solver (``factorize_model``,
budget 0.5, the solvers' default options) and computes the kfwsvd loss curves priced by the
Kronecker model (``model_loss_curves``, the allocation's input), once in this process and once
fanned out (``map_groups`` of ``compression.parallel: <scheduler address>``) to a ``LocalCluster`` of ``--workers`` single-thread worker
processes on this machine; prints the medians over ``--repeats`` runs, the cluster's start-up and
the first (cold) fan-out, and checks that every fanned-out result equals the sequential one bit
for bit (factors, losses, loss histories without their times).

The model is the latest ``fine_tuned_model`` with its Fisher and calibration statistics when a
default ``kedro run`` has made them; otherwise the embedded all-MiniLM-L6-v2 with a seeded
synthetic Fisher and synthetic moments (same shapes, so the same work). Each fan-out task runs
with this process's torch thread count (``--threads``, default torch's), as results must match.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from weighted_lowrank.lowrank.compression import factorize_model, model_loss_curves
from weighted_lowrank.lowrank.dask_map import close_clients
from weighted_lowrank.lowrank.parallel import parse_parallel
from weighted_lowrank.lowrank.targets import select_linear_modules


def default_problem() -> tuple[str, torch.nn.Module, dict, dict, int]:
    """(what it is, model, Fisher tensors, calibration statistics, Fisher examples)."""
    try:
        from project_catalog import load_calibrated, project_catalog

        calibrated = load_calibrated(project_catalog())
        return (
            "the latest fine-tuned model, its Fisher and statistics",
            calibrated.model,
            calibrated.fisher,
            calibrated.statistics,
            calibrated.num_examples,
        )
    except Exception as error:  # no default run yet: the embedded model, synthetic importance
        from weighted_lowrank.hf.models import EMBEDDED_MODEL, load_base_model

        model = load_base_model(EMBEDDED_MODEL, num_labels=2).model.eval()
        generator = torch.Generator().manual_seed(0)
        fisher, moments = {}, {}
        for name, module in select_linear_modules(model).items():
            fisher[f"{name}.weight"] = torch.rand(module.weight.shape, generator=generator) ** 4
            for key, size in (
                ("input_moment", module.in_features),
                ("output_moment", module.out_features),
            ):
                factor = torch.randn(size, 2 * size, generator=generator)
                moments[f"{name}.{key}"] = factor @ factor.T / (2 * size)
            moments[f"{name}.input_abs_mean"] = torch.rand(module.in_features, generator=generator)
        return (
            f"the embedded all-MiniLM-L6-v2, synthetic Fisher and moments (no default run: {error})",
            model,
            fisher,
            moments,
            1,
        )


def same(sequential, fanned) -> bool:
    if (
        isinstance(sequential, dict)
        and sequential
        and hasattr(next(iter(sequential.values())), "losses")
    ):
        return all(
            (curve.losses == fanned[name].losses).all() for name, curve in sequential.items()
        )
    return all(
        torch.equal(result.left, fanned[name].left)
        and torch.equal(result.right, fanned[name].right)
        and result.loss == fanned[name].loss
        and [loss for _, loss in result.history] == [loss for _, loss in fanned[name].history]
        for name, result in sequential.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solvers", default="svd,kfwsvd,als")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    from distributed import LocalCluster

    what, model, fisher, moments, num_examples = default_problem()
    names = [key[: -len(".weight")] for key in fisher]
    print(f"model: {what}; layers: {len(names)}; torch threads: {torch.get_num_threads()}")
    started = time.perf_counter()
    cluster = LocalCluster(
        n_workers=arguments.workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    print(
        f"LocalCluster of {arguments.workers} workers started in {time.perf_counter() - started:.2f} s"
    )
    map_groups = parse_parallel(cluster.scheduler_address).map_groups

    jobs = {
        f"factorize {solver}": (
            lambda solver=solver, **extra: factorize_model(
                model, fisher, arguments.budget, solver, names, statistics=moments, **extra
            )
        )
        for solver in arguments.solvers.split(",")
    }
    jobs["curves kfwsvd (kronecker)"] = lambda **extra: model_loss_curves(
        model,
        fisher,
        "kfwsvd",
        names,
        num_examples=num_examples,
        loss_model="kronecker",
        statistics=moments,
        **extra,
    )
    print(
        "| job | sequential median s | fan-out median s | overhead s | first fan-out s | "
        "identical | runs sequential / fan-out (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    try:
        for label, job in jobs.items():
            started = time.perf_counter()
            first = job(map_groups=map_groups)
            cold = time.perf_counter() - started
            sequential_seconds, fanned_seconds = [], []
            for _ in range(arguments.repeats):
                started = time.perf_counter()
                sequential = job()
                sequential_seconds.append(time.perf_counter() - started)
                started = time.perf_counter()
                fanned = job(map_groups=map_groups)
                fanned_seconds.append(time.perf_counter() - started)
            identical = same(sequential, fanned) and same(sequential, first)
            median_sequential = statistics.median(sequential_seconds)
            median_fanned = statistics.median(fanned_seconds)
            runs = (
                ", ".join(f"{value:.2f}" for value in sequential_seconds)
                + " / "
                + ", ".join(f"{value:.2f}" for value in fanned_seconds)
            )
            print(
                f"| {label} | {median_sequential:.2f} | {median_fanned:.2f} | "
                f"{median_fanned - median_sequential:+.2f} | {cold:.2f} | "
                f"{'yes' if identical else 'NO'} | {runs} |",
                flush=True,
            )
    finally:
        close_clients()
        cluster.close()


if __name__ == "__main__":
    main()
