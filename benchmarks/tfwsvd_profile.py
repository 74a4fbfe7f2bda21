"""Where tfwsvd's time goes, per step, on one same-shape layer group (issue 15).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/tfwsvd_profile.py --model DIR --fisher FILE \
        [--group ffn.in] [--threads 1] [--iters 40] [--reference] [--torch-profiler]

Runs tfwsvd (``max_iters --iters``, ``tol 0``) on the chosen group of the run's layers
(``ffn.in``: the 6 intermediate.dense weights; ``ffn.out``; ``attention``: the 24 384 × 384
weights) at ``--budget`` and prints the cumulative seconds of the solver's steps (line search,
update and gradient, preconditioner refresh and application, start, stopping bookkeeping) from
cProfile, per iteration. ``--reference`` profiles the tfwsvd module of the commit before issue 15
instead (see ``tfwsvd_timing.py``); ``--torch-profiler`` adds the operator table.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from solvers import layer_type, load_run_problem  # noqa: E402
from tfwsvd_timing import BASELINE_COMMIT, reference_module  # noqa: E402

import weighted_lowrank.lowrank.solvers as solvers_package  # noqa: E402
from weighted_lowrank.lowrank.objective import rank_for_budget  # noqa: E402

GROUPS = {
    "ffn.in": ("ffn.in",),
    "ffn.out": ("ffn.out",),
    "attention": ("query", "key", "value", "attn.out"),
}
#: Functions reported, by name (both implementations; missing ones are skipped).
STEPS = (
    "_cg_step",
    "_line_search",
    "_line_search_coefficients",
    "quartic_minimiser",
    "_update_and_gradient",
    "at",
    "of",
    "apply",
    "refreshed",
    "start",
    "initial_factors",
    "record",
    "select",
    "finish",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--fisher", required=True)
    parser.add_argument("--group", default="ffn.in", choices=sorted(GROUPS))
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--torch-profiler", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reference:
        registry = solvers_package._REGISTRY
        registry["tfwsvd"] = replace(
            registry["tfwsvd"], solve=reference_module(BASELINE_COMMIT).solve_tfwsvd
        )
    weights, importance, _ = load_run_problem(args.model, args.fisher)
    names = [n for n in weights if layer_type(n) in GROUPS[args.group]]
    ranks = [rank_for_budget(tuple(weights[n].shape), args.budget) for n in names]

    def run():
        return solvers_package.factorize_batch(
            [weights[n] for n in names],
            [importance[n] for n in names],
            ranks,
            solver="tfwsvd",
            max_iters=args.iters,
            tol=0.0,
        )

    run()  # warm-up
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    run()
    profiler.disable()
    total = time.perf_counter() - started
    print(
        f"{'reference' if args.reference else 'current'} tfwsvd, {args.group}: {len(names)} layers "
        f"{tuple(weights[names[0]].shape)}, budget {args.budget}, {args.iters} iterations, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load {os.getloadavg()[0]:.1f}: {total:.2f} s under cProfile"
    )
    stats = pstats.Stats(profiler).stats
    rows = []
    for (path, _, function), (_, _, _, cumulative, _) in stats.items():
        if function in STEPS and ("tfwsvd" in path or "_common" in path):
            rows.append((cumulative, f"{os.path.basename(path)}:{function}"))
    for cumulative, label in sorted(rows, reverse=True):
        print(
            f"  {label:45s} {cumulative:7.2f} s  {1000 * cumulative / args.iters:8.1f} ms/iter  "
            f"{100 * cumulative / total:5.1f} %"
        )
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
