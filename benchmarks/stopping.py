"""Deterministic stopping (issue 11): where each iterative solver's loss curve flattens.

Two steps, on a fine-tuned model and Fisher saved by a ``kedro run`` (or the cached benchmark
problem of ``benchmarks/solvers.py`` when ``--model``/``--fisher`` are left out):

``python benchmarks/stopping.py trace --model DIR --fisher FILE --budgets 0.5,0.3``
    runs every iterative solver on all targeted weights with ``tol = 0`` for a fixed number of
    iterations (``--iters adam=3000,als=12``) and stores every layer's loss after every
    iteration under ``benchmarks/.cache/stopping/``. Iteration counts and losses are
    deterministic; the stored seconds are only as good as the machine's load (noted).

``python benchmarks/stopping.py report --model DIR --fisher FILE --budgets 0.5,0.3``
    reads the traces and, per solver, finds the *plateau* of the summed (over all layers) loss
    curve S(n) (best iterate after n iterations): the smallest n at which doubling the
    iterations gains less than ``--material`` (default 1 %) of what the solver has gained from
    its start, ``S(n) − S(2n) ≤ material · (S(0) − S(2n))``. It then replays the code's stopping
    rule on the traces for candidate ``tol`` values (exact: a layer's stop depends only on its
    own trace), runs the solvers with their current code defaults to time them and to check the
    replay, and writes the "stopping" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from doc_sections import write_section  # noqa: E402  (benchmarks/ is the script directory)
from solvers import (  # noqa: E402
    BENCHMARKS_PATH,
    CACHE_DIR,
    load_run_problem,
    prepare_real_problem,
)

from weighted_lowrank.lowrank.objective import rank_for_budget  # noqa: E402
from weighted_lowrank.lowrank.solvers import (  # noqa: E402
    STOPPING_WINDOWS,
    factorize_batch,
    solver_options,
)

TRACE_DIR = CACHE_DIR / "stopping"
ITERATIVE = ("adam", "sgd", "adam_sgd", "als", "em", "tfwsvd")
#: Iterations of the traces unless --iters says otherwise.
TRACE_ITERS = {
    "adam": 3000,
    "sgd": 3000,
    "adam_sgd": 3000,
    "als": 12,
    "em": 300,
    "tfwsvd": 400,
}
TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 0.0)
GROUP_NAMES = {(384, 384): "attn 384×384", (1536, 384): "ffn-in 1536×384", (384, 1536): "ffn-out"}


def group_name(shape) -> str:
    """Short name of a same-shape group (MiniLM's three; others by shape)."""
    shape = tuple(shape)
    return GROUP_NAMES.get(shape, f"{shape[0]}×{shape[1]}")


def load_problem(args) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    if args.model is not None:
        return load_run_problem(args.model, args.fisher)
    return prepare_real_problem()


def trace_path(budget: float, solver: str) -> Path:
    return TRACE_DIR / f"trace_{budget:g}_{solver}.json"


def ranks_for(names, weights, budget):
    return [rank_for_budget(tuple(weights[n].shape), budget) for n in names]


def run(solver, names, weights, importance, budget, options):
    """One ``factorize_batch`` over all layers: (results, wall seconds, load before/after)."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = factorize_batch(
        [weights[n] for n in names],
        [importance[n] for n in names],
        ranks_for(names, weights, budget),
        solver=solver,
        **options,
    )
    return results, time.perf_counter() - started, load_before, os.getloadavg()[0]


# ----------------------------------------------------------------------------- traces


def command_trace(args) -> int:
    weights, importance, source = load_problem(args)
    names = list(weights)
    iters = dict(TRACE_ITERS)
    for item in filter(None, (args.iters or "").split(",")):
        solver, count = item.split("=")
        iters[solver.strip()] = int(count)
    TRACE_DIR.mkdir(parents=True, exist_ok=True)
    for budget in parse_budgets(args.budgets):
        for solver in args.solvers.split(","):
            path = trace_path(budget, solver)
            if path.is_file() and not args.refresh:
                print(f"{path} exists (--refresh to redo)", flush=True)
                continue
            options = {"max_iters": iters[solver], "tol": 0.0, "max_seconds": None}
            results, seconds, before, after = run(
                solver, names, weights, importance, budget, options
            )
            record = {
                "solver": solver,
                "budget": budget,
                "source": source,
                "options": options,
                "names": names,
                "shapes": [list(weights[n].shape) for n in names],
                "losses": [[loss for _, loss in r.history] for r in results],
                "seconds": [[s for s, _ in r.history] for r in results],
                "group_seconds": [r.seconds for r in results],
                "iterations": [r.iterations for r in results],
                "stop_reasons": [r.stop_reason for r in results],
                "final_loss": [r.loss for r in results],
                "wall": seconds,
                "threads": torch.get_num_threads(),
                "load": [before, after],
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            }
            path.write_text(json.dumps(record))
            print(
                f"[{budget:g}] {solver}: {iters[solver]} iterations in {seconds:.0f} s "
                f"(load {before:.1f}→{after:.1f}); summed loss {sum(r.loss for r in results):.4f}",
                flush=True,
            )
    return 0


# ----------------------------------------------------------------------------- analysis


def best_so_far(losses: list[float], length: int) -> list[float]:
    """Best loss after n iterations, n = 0..length-1 (a trace that stopped early stays flat)."""
    out, best = [], float("inf")
    for n in range(length):
        best = min(best, losses[min(n, len(losses) - 1)])
        out.append(best)
    return out


def summed_curve(trace: dict) -> list[float]:
    length = max(len(losses) for losses in trace["losses"])
    curves = [best_so_far(losses, length) for losses in trace["losses"]]
    return [sum(values) for values in zip(*curves, strict=True)]


def plateau_iteration(curve: list[float], material: float) -> int | None:
    """Smallest n with S(n) − S(2n) ≤ material · (S(0) − S(2n)); None if not within the trace."""
    for n in range(1, (len(curve) - 1) // 2 + 1):
        gained = curve[0] - curve[2 * n]
        if curve[n] - curve[2 * n] <= material * max(gained, 0.0):
            return n
    return None


def replay(losses: list[float], tol: float, window: int, max_iters: int) -> tuple[int, float, str]:
    """The stopping rule of ``run_iterations`` replayed on one layer's trace.

    Step j records the loss of point j − 1; a layer stops when its best loss improved by at most
    ``tol`` (relative) over the last ``window`` records, or at ``max_iters``; it returns the best
    of points 0..j. Returns (iterations, loss, stop reason).
    """

    def at(k: int) -> float:
        return losses[min(k, len(losses) - 1)]

    best, trace, j = float("inf"), [], 0
    while True:
        if j >= max_iters:
            return j, min(at(k) for k in range(j + 1)), "max_iters"
        j += 1
        best = min(best, at(j - 1))
        trace.append(best)
        if len(trace) > window:
            earlier, current = trace[-window - 1], trace[-1]
            if earlier - current <= tol * abs(earlier) or current == 0.0:
                return j, min(best, at(j)), "converged"


def groups_of(trace: dict) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, shape in enumerate(trace["shapes"]):
        groups.setdefault(group_name(shape), []).append(index)
    return groups


def replay_solver(trace: dict, tol: float, window: int, max_iters: int) -> dict:
    """Replay on every layer: summed loss, iterations per group, and an estimated time.

    The time estimate charges each layer-iteration ``1/b`` of its group's full-batch iteration
    cost in the trace (``b`` layers in the group; stopped layers leave the batch), plus the
    group's start-up; smaller batches use the cores less well, so it is a rough lower bound on
    the machine load of the trace.
    """
    stops = [replay(losses, tol, window, max_iters) for losses in trace["losses"]]
    per_group, seconds = {}, 0.0
    for name, indices in groups_of(trace).items():
        iterations = [stops[i][0] for i in indices]
        per_group[name] = iterations
        longest = max(indices, key=lambda i: len(trace["seconds"][i]))
        clock = trace["seconds"][longest]
        per_iteration = (clock[-1] - clock[0]) / max(len(clock) - 1, 1)
        seconds += clock[0] + per_iteration * sum(iterations) / len(indices)
    return {
        "loss": sum(stop[1] for stop in stops),
        "per_group": per_group,
        "capped": sum(1 for stop in stops if stop[2] == "max_iters"),
        "seconds": seconds,
    }


def parse_budgets(text: str) -> list[float]:
    return [float(b) for b in text.split(",") if b.strip()]


def span(values: list[int]) -> str:
    low, high = min(values), max(values)
    median = statistics.median(values)
    return f"{low}" if low == high else f"{low}–{high} (median {median:g})"


def command_report(args) -> int:
    weights, importance, source = load_problem(args)
    names = list(weights)
    solvers = args.solvers.split(",")
    lines: list[str] = []
    for budget in parse_budgets(args.budgets):
        traces = {s: json.loads(trace_path(budget, s).read_text()) for s in solvers}
        svd_results, _, _, _ = run("svd", names, weights, importance, budget, {})
        svd_loss = sum(r.loss for r in svd_results)
        fwsvd_results, _, _, _ = run("fwsvd", names, weights, importance, budget, {})
        fwsvd_loss = sum(r.loss for r in fwsvd_results)
        curves = {s: summed_curve(t) for s, t in traces.items()}
        own = {s: curve[-1] for s, curve in curves.items()}
        best = min(own.values())
        print(f"\n=== budget {budget:g}: svd {svd_loss:.4f}, fwsvd {fwsvd_loss:.4f} ===")
        print("solver | trace iters | trace s | S(0) | S(end) | plateau n (S(n))")
        for solver in solvers:
            curve = curves[solver]
            n = plateau_iteration(curve, args.material)
            print(
                f"{solver} | {len(curve) - 1} | {traces[solver]['wall']:.0f} | {curve[0]:.4f} | "
                f"{curve[-1]:.4f} | {n} ({curve[n]:.4f})"
                if n
                else f"{solver} | {len(curve) - 1} | {traces[solver]['wall']:.0f} | "
                f"{curve[0]:.4f} | {curve[-1]:.4f} | not reached"
            )
        if args.sweep:
            print(
                "\nreplayed stopping rule: solver, tol, max_iters → loss gap to own plateau, "
                "iterations per group, est. seconds (trace clock)"
            )
            for solver in solvers:
                window = STOPPING_WINDOWS[solver]
                cap = len(curves[solver]) - 1
                for max_iters in sorted({cap, *args.caps.get(solver, [])}):
                    for tol in TOLS:
                        out = replay_solver(traces[solver], tol, window, max_iters)
                        groups = "; ".join(f"{g} {span(v)}" for g, v in out["per_group"].items())
                        print(
                            f"{solver} tol {tol:g} max {max_iters}: gap "
                            f"{100 * (out['loss'] / own[solver] - 1):.4f} % "
                            f"(to best {100 * (out['loss'] / best - 1):.3f} %), "
                            f"capped {out['capped']}, {groups}, ≈{out['seconds']:.1f} s"
                        )
        # the code defaults, run for real
        rows = []
        for solver in solvers:
            defaults = solver_options(solver)
            timings, results = [], None
            for _ in range(args.repeats):
                results, seconds, before, after = run(
                    solver, names, weights, importance, budget, {}
                )
                timings.append((seconds, before, after))
            loss = sum(r.loss for r in results)
            replayed = replay_solver(
                traces[solver], defaults["tol"], STOPPING_WINDOWS[solver], defaults["max_iters"]
            )
            per_group: dict[str, list[int]] = {}
            reasons: dict[str, int] = {}
            for name, result in zip(names, results, strict=True):
                per_group.setdefault(group_name(weights[name].shape), []).append(result.iterations)
                reasons[result.stop_reason] = reasons.get(result.stop_reason, 0) + 1
            agrees = replayed["per_group"] == per_group
            rows.append(
                {
                    "solver": solver,
                    "defaults": defaults,
                    "per_group": per_group,
                    "reasons": reasons,
                    "loss": loss,
                    "own": own[solver],
                    "best": best,
                    "svd": svd_loss,
                    "fwsvd": fwsvd_loss,
                    "timings": timings,
                    "agrees": agrees,
                    "trace_iters": len(curves[solver]) - 1,
                    "plateau": plateau_iteration(curves[solver], args.material),
                }
            )
            print(
                f"default {solver}: {per_group} {reasons} loss {loss:.4f} "
                f"(replay {replayed['loss']:.4f}, iterations agree: {agrees}); "
                + ", ".join(f"{s:.1f} s (load {b:.1f}→{a:.1f})" for s, b, a in timings),
                flush=True,
            )
        lines += render_budget(budget, rows, svd_loss, fwsvd_loss, best)
    if args.write:
        command = "python benchmarks/stopping.py " + " ".join(sys.argv[1:])
        machine = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        header = [
            f"Command: `{command.strip()}` (after `… trace` with the same model and Fisher)  ",
            f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
            f"Machine: {machine}; load average during the default runs in the seconds column.  ",
            f"Model and importance: {source}.  ",
            "",
        ]
        write_section(
            Path(args.output), "stopping", "\n".join(header + lines), "benchmarks/stopping.py"
        )
        print(f"wrote the stopping section of {args.output}")
    return 0


def render_budget(budget, rows, svd_loss, fwsvd_loss, best) -> list[str]:
    lines = [
        f"**Budget {budget:g}** — summed weighted loss over the 36 weights: SVD {svd_loss:.4f}, "
        f"two-sided FWSVD {fwsvd_loss:.4f} ({fwsvd_loss / svd_loss:.4f} × SVD); best plateau "
        f"of any solver {best:.4f} ({best / svd_loss:.4f} × SVD).",
        "",
        "| solver | max_iters / tol (window) | iterations per group: attention · FFN-in · FFN-out "
        "| stop reasons | summed loss / SVD | plateau (trace length) | gap to own plateau "
        "| gap to best plateau | seconds (load avg) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for row in rows:
        defaults = row["defaults"]
        groups = " · ".join(span(v) for v in row["per_group"].values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row["reasons"].items()))
        seconds = [s for s, _, _ in row["timings"]]
        total += statistics.median(seconds)
        timing = ", ".join(f"{s:.1f} ({b:.1f})" for s, b, _ in row["timings"])
        gap = 100 * (row["loss"] / row["own"] - 1)
        if row["plateau"] is None:
            plateau = f"not reached ({row['trace_iters']})"
            gap_text = f"≥ {gap:+.3f} %"
        else:
            plateau = f"n = {row['plateau']} ({row['trace_iters']})"
            gap_text = f"{gap:+.3f} %"
        lines.append(
            f"| {row['solver']} | {defaults['max_iters']} / {defaults['tol']:g} "
            f"({STOPPING_WINDOWS[row['solver']]}) | {groups} | {reasons} | "
            f"{row['loss'] / svd_loss:.4f} | {plateau} | {gap_text} "
            f"| {100 * (row['loss'] / best - 1):+.3f} % | {timing} |"
        )
    lines += ["", f"Sum of the medians: {total:.0f} s for the six iterative solvers.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("trace", "report"))
    parser.add_argument("--model", default=None, help="saved fine-tuned model directory")
    parser.add_argument("--fisher", default=None, help="saved fisher_information.safetensors")
    parser.add_argument("--budgets", default="0.5", help="comma-separated parameter fractions")
    parser.add_argument("--solvers", default=",".join(ITERATIVE))
    parser.add_argument("--iters", default=None, help='trace lengths, e.g. "adam=3000,als=12"')
    parser.add_argument("--refresh", action="store_true", help="redo existing traces")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--material", type=float, default=0.01, help="plateau threshold (share of the gain)"
    )
    parser.add_argument("--sweep", action="store_true", help="print the replayed tol sweep")
    parser.add_argument(
        "--caps", default="", help='extra max_iters for the sweep, e.g. "als=1,2;em=20,40"'
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of the defaults")
    parser.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md")
    parser.add_argument("--output", default=str(BENCHMARKS_PATH))
    args = parser.parse_args(argv)
    if (args.model is None) != (args.fisher is None):
        parser.error("--model and --fisher go together")
    caps: dict[str, list[int]] = {}
    for item in filter(None, args.caps.split(";")):
        solver, values = item.split("=")
        caps[solver.strip()] = [int(v) for v in values.split(",")]
    args.caps = caps
    if args.threads:
        torch.set_num_threads(args.threads)
    return command_trace(args) if args.command == "trace" else command_report(args)


if __name__ == "__main__":
    raise SystemExit(main())
