"""Capacity on paper: per-layer solve time and memory of each solver, extrapolated to BERT-base
and a 7B LLaMA-architecture decoder.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/capacity.py [--threads 2] [--repeats 3] \
        [--large] [--sample-iterations 3] [--iterations tfwsvd=21:39,adam=88:357,...] \
        [--parallel threads]

Each solver runs through ``factorize_batch`` on one random layer of each shape at budget 0.5
(rank ⌊0.5·out·in/(out+in)⌋): a Gaussian weight, a Fisher-like positive importance (row profile ×
column profile × log-normal noise), random positive-definite moments A (in × in) and G (out × out)
and a positive |x|. Timing depends on the shapes, not on the values — except through the
iteration counts of the iterative solvers, which are therefore not taken from these random layers.
Shapes: BERT-base's 768 × 768, 3072 × 768 and 768 × 3072; with ``--large`` also the 7B
decoder's 4096 × 4096, 11008 × 4096 and 4096 × 11008. ALS is measured for its default one sweep on
the BERT-base shapes only (one sweep of a 4096 × 11008 layer is ≈ 10¹⁴ flops) and extrapolated
by its cost ``out·in·r² + (out+in)·r³``.

An iterative solver (tfwsvd, adam, adam_sgd, sgd, em) is timed as its start (``max_iters 0``)
plus ``--sample-iterations`` iterations (``tol 0``); a layer's time is start + n × per-iteration,
with n the iteration counts its default stopping rule took on the default MiniLM at budget 0.5
(median and maximum over the 36 layers, from the run's ``layer_report.parquet``; ``--iterations``
overrides them). The closed forms are timed whole. ``--parallel`` (a ``compression.parallel``
form, default ``threads``: the worker threads the documented runs under ``OMP_WAIT_POLICY=PASSIVE``
had) sets the worker threads that share a layer's small CPU work.

Memory is the peak resident-set growth of the process during one call (sampled every 5 ms), i.e.
what one layer solve adds to a worker that already holds the layer's weight and importance.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from weighted_lowrank.lowrank.objective import rank_for_budget  # noqa: E402
from weighted_lowrank.lowrank.parallel import parse_parallel  # noqa: E402
from weighted_lowrank.lowrank.solvers import factorize_batch, solver_needs  # noqa: E402

BUDGET = 0.5
SOLVERS = (
    "svd",
    "fwsvd",
    "kfwsvd",
    "svd_llm",
    "asvd",
    "tfwsvd",
    "adam",
    "adam_sgd",
    "sgd",
    "em",
    "als",
)
#: Iterations per layer (median, max) of each iterative solver's default stopping rule on the
#: default MiniLM at budget 0.5 (``kedro run`` of 2026-12-05, ``data/07_model_output/<solver>/
#: layer_report.parquet``): tfwsvd and adam/adam_sgd converge on ``tol``, sgd and em stop at
#: ``max_iters``.
DEFAULT_ITERATIONS = {
    "tfwsvd": (21, 39),
    "adam": (88, 357),
    "adam_sgd": (88, 349),
    "sgd": (50, 50),
    "em": (5, 5),
}
BERT_SHAPES = ((768, 768), (3072, 768), (768, 3072))
LLAMA_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
#: Targeted layers per model: {(out, in): count}.
MODELS = {
    "BERT-base (12 blocks: Q, K, V, O 768×768; FFN-in 3072×768; FFN-out 768×3072)": {
        (768, 768): 12 * 4,
        (3072, 768): 12,
        (768, 3072): 12,
    },
    "7B LLaMA decoder (32 blocks: q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008)": {
        (4096, 4096): 32 * 4,
        (11008, 4096): 32 * 2,
        (4096, 11008): 32,
    },
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakMemory:
    """Peak RSS growth over a ``with`` block, sampled every 5 ms by a thread."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def random_layer(out_features: int, in_features: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
    rows = torch.rand(out_features, generator=generator) ** 3 + 0.01
    cols = torch.rand(in_features, generator=generator) ** 3 + 0.01
    importance = torch.outer(rows, cols)
    importance.mul_(torch.randn(out_features, in_features, generator=generator).mul_(0.8).exp_())

    def moment(size: int) -> torch.Tensor:
        samples = torch.randn(size, min(size, 512), generator=generator)
        matrix = samples @ samples.T / samples.shape[1]
        return matrix.add_(torch.eye(size), alpha=0.01)

    return {
        "weight": weight,
        "importance": importance,
        "statistics": {
            "input_moment": moment(in_features),
            "output_moment": moment(out_features),
            "input_abs_mean": torch.rand(in_features, generator=generator) + 0.1,
        },
    }


def solve(layer: dict, solver: str, **options) -> tuple[float, int]:
    out_features, in_features = layer["weight"].shape
    rank = rank_for_budget((out_features, in_features), BUDGET)
    statistics_ = {name: layer["statistics"][name] for name in solver_needs(solver)}
    with PeakMemory() as memory:
        started = time.perf_counter()
        factorize_batch(
            [layer["weight"]],
            [layer["importance"]],
            [rank],
            solver=solver,
            statistics=[statistics_] if statistics_ else None,
            **options,
        )
        seconds = time.perf_counter() - started
    return seconds, memory.grown


def als_cost(out_features: int, in_features: int) -> float:
    rank = rank_for_budget((out_features, in_features), BUDGET)
    return out_features * in_features * rank**2 + (out_features + in_features) * rank**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="runs per (solver, BERT shape)")
    parser.add_argument("--large", action="store_true", help="also measure the 7B shapes (once)")
    parser.add_argument(
        "--sample-iterations", type=int, default=3, help="iterations timed per iterative solver"
    )
    parser.add_argument(
        "--iterations",
        default="",
        help="solver=median:max,… iterations per layer for the extrapolation "
        f"(default {','.join(f'{k}={a}:{b}' for k, (a, b) in DEFAULT_ITERATIONS.items())})",
    )
    parser.add_argument(
        "--targets", default="600,3600", help="target wall times (s) for the workers column"
    )
    parser.add_argument("--parallel", default="threads", help="serial, threads or threads:N")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = parse_parallel(args.parallel).threads
    iterations = dict(DEFAULT_ITERATIONS)
    for item in filter(None, args.iterations.split(",")):
        solver, _, counts = item.partition("=")
        if solver not in DEFAULT_ITERATIONS:
            parser.error(f"--iterations: {solver!r} is not one of {list(DEFAULT_ITERATIONS)}")
        median, _, largest = counts.partition(":")
        iterations[solver] = (int(median), int(largest or median))
    targets = [float(v) for v in args.targets.split(",")]
    shapes = list(BERT_SHAPES) + (list(LLAMA_SHAPES) if args.large else [])
    measured: dict[tuple[str, tuple[int, int]], dict] = {}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for shape in shapes:
        layer = random_layer(*shape)
        repeats = args.repeats if shape in BERT_SHAPES else 1
        for solver in SOLVERS:
            if solver == "als" and shape not in BERT_SHAPES:
                continue
            runs, memories, per_iteration = [], [], []
            for _ in range(repeats):
                if solver in iterations:
                    start, memory0 = solve(layer, solver, threads=threads, max_iters=0)
                    sample = args.sample_iterations
                    total, memory1 = solve(
                        layer, solver, threads=threads, max_iters=sample, tol=0.0
                    )
                    runs.append(start)
                    per_iteration.append((total - start) / sample)
                    memories.append(max(memory0, memory1))
                else:
                    seconds, memory = solve(layer, solver, threads=threads)
                    runs.append(seconds)
                    memories.append(memory)
            record = {
                "seconds": statistics.median(runs),
                "runs": runs,
                "memory": max(memories),
                "load": os.getloadavg()[0],
            }
            if per_iteration:
                record["per_iteration"] = statistics.median(per_iteration)
            measured[(solver, shape)] = record
            extra = f", {record['per_iteration']:.3f} s/iteration" if per_iteration else ""
            print(
                f"{solver:8s} {shape[0]:5d}×{shape[1]:<5d} rank "
                f"{rank_for_budget(shape, BUDGET):4d}: {record['seconds']:.3f} s"
                f"{' (start)' if per_iteration else ''}{extra}, +{record['memory'] / 2**20:.0f} MiB "
                f"(runs {', '.join(f'{r:.3f}' for r in runs)}; load {record['load']:.1f})",
                flush=True,
            )
        del layer

    def layer_seconds(solver: str, shape: tuple[int, int], count: int) -> tuple[float, str]:
        """Seconds for one layer (``count`` iterations if iterative) and how it was obtained."""
        record = measured.get((solver, shape))
        if solver in iterations:
            if record is None:
                return math.nan, "not measured"
            return record["seconds"] + count * record["per_iteration"], "measured"
        if record is not None:
            return record["seconds"], "measured"
        if solver == "als":
            base = (768, 3072)
            scale = als_cost(*shape) / als_cost(*base)
            return measured[("als", base)][
                "seconds"
            ] * scale, "extrapolated (out·in·r² + (out+in)·r³)"
        return math.nan, "not measured"

    print("\n### Per layer (measured unless marked)\n")
    print("| solver | shape (out×in) | rank | s per layer | peak memory added | how |")
    print("|---|---|---|---|---|---|")
    for shape in list(BERT_SHAPES) + list(LLAMA_SHAPES):
        for solver in SOLVERS:
            median = iterations[solver][0] if solver in iterations else 0
            seconds, how = layer_seconds(solver, shape, median)
            record = measured.get((solver, shape))
            memory = f"{record['memory'] / 2**20:.0f} MiB" if record else "—"
            note = how
            if solver in iterations and record:
                note = (
                    f"start {record['seconds']:.2f} s + {median} × "
                    f"{record['per_iteration']:.3f} s/iteration"
                )
            print(
                f"| {solver} | {shape[0]}×{shape[1]} | {rank_for_budget(shape, BUDGET)} | "
                f"{seconds:.2f} | {memory} | {note} |"
            )

    for model, counts in MODELS.items():
        layers = sum(counts.values())
        weights = sum(o * i * n for (o, i), n in counts.items())
        fisher = 4 * weights
        input_moment = 4 * sum(i * i * n for (_, i), n in counts.items())
        output_moment = 4 * sum(o * o * n for (o, _), n in counts.items())
        abs_mean = 4 * sum(i * n for (_, i), n in counts.items())
        largest = max(counts, key=lambda s: s[0] * s[1])
        print(f"\n### {model}\n")
        print(
            f"{layers} targeted layers, {weights / 1e6:.0f} M weights. Calibration statistics "
            f"(float32, one tensor per module as stored): Fisher {fisher / 2**30:.2f} GiB, A "
            f"(in×in) {input_moment / 2**30:.2f} GiB, G (out×out) {output_moment / 2**30:.2f} GiB, "
            f"|x| {abs_mean / 2**20:.2f} MiB; one layer's weight + importance (float32) up to "
            f"{8 * largest[0] * largest[1] / 2**20:.0f} MiB.\n"
        )
        header = "| solver | total s on one 2-core machine | largest layer s | peak memory of one solve |"
        header += "".join(f" workers for {t / 60:g} min |" for t in targets)
        print(header)
        print("|---" * (4 + len(targets)) + "|")
        for solver in SOLVERS:
            counts_per_layer = iterations.get(solver, (0,))
            totals = [
                sum(layer_seconds(solver, shape, count)[0] * n for shape, n in counts.items())
                for count in dict.fromkeys(counts_per_layer)
            ]
            slowest = max(layer_seconds(solver, shape, counts_per_layer[-1])[0] for shape in counts)
            memories = [
                measured[(solver, shape)]["memory"]
                for shape in counts
                if (solver, shape) in measured
            ]
            memory = f"{max(memories) / 2**20:.0f} MiB" if memories else "—"
            total_text = " – ".join(f"{t:.0f}" for t in totals)
            if solver in iterations:
                total_text += (
                    f" ({'–'.join(str(c) for c in dict.fromkeys(counts_per_layer))} iterations "
                    "per layer)"
                )
            if solver == "als":
                total_text += " (one sweep)"
            cells = [
                "—"
                if math.isnan(totals[-1])
                else "unreachable (largest layer)"
                if slowest > target
                else str(max(1, math.ceil(totals[-1] / target)))
                for target in targets
            ]
            print(
                f"| {solver} | {total_text} | {slowest:.1f} | {memory} | "
                + " | ".join(cells)
                + " |"
            )


if __name__ == "__main__":
    main()
