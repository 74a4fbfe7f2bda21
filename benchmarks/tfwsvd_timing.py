"""tfwsvd on all targeted layers: wall time and distance to the best known loss, variants interleaved.

    python benchmarks/tfwsvd_timing.py --model DIR --fisher FILE --repeats 5 [--threads 1] \
        [--variants current,reference] [--budget 0.5]

``current`` is the solver as it is in the working tree; ``reference`` the tfwsvd module of
commit ``--reference-commit`` (default: the commit before issue 15, the unfused iteration) with
that commit's default options, run through the same ``factorize_batch``; ``current:<option>=<value>,…`` runs the current solver with
options (e.g. ``current:init=kfwsvd``; statistics come from ``--statistics``). Every repeat runs
every variant once, in turn, so a load spike on a shared machine hits all of them.

The *best known* loss of each layer is the lowest of a long tfwsvd run (``max_iters 2000``,
``tol 0``, cached in ``benchmarks/.cache``) and every variant's result; the table gives each
variant's summed loss above the summed best, its worst layer, and its iteration counts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from commit_modules import CACHE_DIR, module_at_commit  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from solvers import load_run_problem, run_solver  # noqa: E402

import weighted_lowrank.lowrank.solvers as solvers_package  # noqa: E402
from weighted_lowrank.lowrank.objective import rank_for_budget  # noqa: E402

#: The last commit with the unfused tfwsvd iteration (issue 15's baseline).
BASELINE_COMMIT = "df7a07e"
TFWSVD_PATH = "src/weighted_lowrank/lowrank/solvers/tfwsvd.py"


def reference_module(commit: str):
    """The tfwsvd module of ``commit``, imported under another name (it uses today's _common)."""
    return module_at_commit(commit, TFWSVD_PATH, "tfwsvd")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key] = value
    return name, options


def best_known(names, weights, importance, budget, fisher_path) -> dict[str, float]:
    """Per-layer loss of a long tfwsvd run (max_iters 2000, tol 0), cached by Fisher and budget."""
    digest = hashlib.sha256(f"{Path(fisher_path).resolve()}|{budget}".encode()).hexdigest()[:16]
    path = CACHE_DIR / f"tfwsvd_best_{digest}.safetensors"
    if path.is_file():
        losses = load_file(str(path))
        if all(n in losses for n in names):
            return {n: float(losses[n]) for n in names}
    started = time.perf_counter()
    results, _ = run_solver(
        "tfwsvd", names, weights, importance, budget, {"max_iters": 2000, "tol": 0.0}
    )
    print(f"long reference run: {time.perf_counter() - started:.0f} s", flush=True)
    losses = {n: torch.tensor(results[n].loss, dtype=torch.float64) for n in names}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_file(losses, str(path))
    return {n: float(v) for n, v in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--fisher", required=True)
    parser.add_argument("--statistics", default=None, help="calibration_statistics.safetensors")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default="current,reference")
    parser.add_argument("--reference-commit", default=BASELINE_COMMIT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    weights, importance, source = load_run_problem(args.model, args.fisher)
    names = list(weights)
    best = best_known(names, weights, importance, args.budget, args.fisher)
    registry = solvers_package._REGISTRY
    current_spec = registry["tfwsvd"]
    reference = reference_module(args.reference_commit)
    # The reference runs with its own defaults (tol, …), which the front end reads from the spec.
    reference_spec = replace(
        current_spec, solve=reference.solve_tfwsvd, options=dict(reference.TFWSVD_OPTIONS)
    )
    statistics_by_layer = None
    if args.statistics:
        tensors = load_file(args.statistics)
        statistics_by_layer = {
            n: {
                key: tensors[f"{n[: -len('.weight')]}.{key}"]
                for key in ("input_moment", "output_moment", "input_abs_mean")
            }
            for n in names
        }
    variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    walls: dict[str, list[float]] = {text: [] for text in args.variants.split(",")}
    outcome: dict[str, dict] = {}
    loads = []
    for repeat in range(args.repeats):
        for text, (name, options) in zip(walls, variants, strict=True):
            registry["tfwsvd"] = reference_spec if name == "reference" else current_spec
            loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            results = solvers_package.factorize_batch(
                [weights[n] for n in names],
                [importance[n] for n in names],
                [rank_for_budget(tuple(weights[n].shape), args.budget) for n in names],
                solver="tfwsvd",
                statistics=(
                    [statistics_by_layer[n] for n in names]
                    if statistics_by_layer and options.get("init") == "kfwsvd"
                    else None
                ),
                **options,
            )
            walls[text].append(time.perf_counter() - started)
            outcome[text] = dict(zip(names, results, strict=True))
            print(f"run {repeat + 1} {text}: {walls[text][-1]:.2f} s", flush=True)
    registry["tfwsvd"] = current_spec
    for n in names:
        best[n] = min(best[n], *(outcome[text][n].loss for text in outcome))
    total_best = sum(best.values())
    print(
        f"\n{source}; {len(names)} layers, budget {args.budget}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"load average at the start of the runs {min(loads):.1f}–{max(loads):.1f}"
    )
    print(
        "| variant | median s | runs (s) | summed loss above best | worst layer above best | "
        "layers within 0.1 % | iterations min–median–max |"
    )
    print("|---|---|---|---|---|---|---|")
    for text in walls:
        results = outcome[text]
        gaps = {n: results[n].loss / best[n] - 1 for n in names}
        worst = max(gaps, key=gaps.get)
        iterations = sorted(results[n].iterations for n in names)
        total = sum(results[n].loss for n in names)
        print(
            f"| {text} | {statistics.median(walls[text]):.2f} | "
            f"{', '.join(f'{w:.2f}' for w in walls[text])} | {100 * (total / total_best - 1):.4f} % | "
            f"{100 * gaps[worst]:.4f} % ({worst.split('encoder.')[-1]}) | "
            f"{sum(g <= 1e-3 for g in gaps.values())}/{len(names)} | "
            f"{iterations[0]}–{statistics.median(iterations):.0f}–{iterations[-1]} |"
        )


if __name__ == "__main__":
    sys.exit(main())
