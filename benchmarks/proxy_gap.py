"""How far the element-wise solvers' proxy curve is from the loss they reach at the chosen ranks.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/proxy_gap.py [--budgets 0.5 0.3 0.2] [--solver tfwsvd]
        [--load-versions fine_tuned_model:<v>,fisher_information:<v>,calibration_statistics:<v>]

The element-wise solvers (tfwsvd, adam, …) have no spectrum: their loss-vs-rank curve is the
two-sided FWSVD spectrum of the same diagonal Fisher (docs/METHOD.md "Rank allocation"). For each
budget this allocates globally on that proxy, solves every layer with ``--solver`` at the chosen
ranks, and prints the proxy's prediction against the diagonal loss ½ Σ I ΔW² / N the solver
reaches (nats per example), summed and per layer (median and range of achieved / predicted),
next to the same for the uniform ranks.
"""

from __future__ import annotations

import argparse
import statistics

from project_catalog import load_calibrated, project_catalog  # benchmarks/ is the script directory

from weighted_lowrank.lowrank.allocation import (
    allocate_ranks,
    parameter_budget,
    uniform_ranks,
)
from weighted_lowrank.lowrank.compression import factorize_model, model_loss_curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    parser.add_argument("--solver", default="tfwsvd")
    parser.add_argument("--load-versions", default="")
    arguments = parser.parse_args()
    versions = dict(item.split(":", 1) for item in arguments.load_versions.split(",") if item)
    catalog = project_catalog(versions)
    calibrated = load_calibrated(catalog)
    model, fisher, names = calibrated.model, calibrated.fisher, calibrated.names
    num_examples, statistics_tensors = calibrated.num_examples, calibrated.statistics
    curves = model_loss_curves(
        model,
        fisher,
        arguments.solver,
        names,
        num_examples=num_examples,
        statistics=statistics_tensors,
    )
    shapes = {name: (curve.out_features, curve.in_features) for name, curve in curves.items()}
    print(f"solver {arguments.solver}, curve: two-sided FWSVD proxy, {len(names)} layers")
    print(
        "| budget | allocation | Σ proxy prediction | Σ reached (diagonal) | reached / predicted: "
        "sum | per layer median [min, max] |"
    )
    print("|---|---|---|---|---|---|")
    for budget in arguments.budgets:
        allocations = {
            "uniform": dict(uniform_ranks(shapes, budget)),
            "global": allocate_ranks(curves, parameter_budget(shapes, budget)).ranks,
        }
        for allocation, ranks in allocations.items():
            results = factorize_model(
                model,
                fisher,
                None,
                arguments.solver,
                names,
                ranks=ranks,
                statistics=statistics_tensors,
            )
            predicted = {
                name: float(curves[name].losses[r.rank - 1]) for name, r in results.items()
            }
            reached = {name: 0.5 * float(r.loss) / num_examples for name, r in results.items()}
            ratios = [reached[name] / predicted[name] for name in results if predicted[name] > 0]
            total_predicted, total_reached = sum(predicted.values()), sum(reached.values())
            print(
                f"| {budget} | {allocation} | {total_predicted:.4f} | {total_reached:.4f} | "
                f"{total_reached / total_predicted:.3f} | {statistics.median(ratios):.3f} "
                f"[{min(ratios):.3f}, {max(ratios):.3f}] |",
                flush=True,
            )


if __name__ == "__main__":
    main()
