"""Benchmark of the weighted low-rank solvers on the default model's 36 encoder Linear weights.

Run ``python benchmarks/solvers.py`` (``--quick`` for a smoke run). It fine-tunes the embedded
all-MiniLM-L6-v2 briefly on the embedded Rotten Tomatoes snippets, estimates a real importance
(empirical Fisher), caches both under ``benchmarks/.cache/``, then factorizes every targeted
weight with every solver and reports the loss relative to SVD / FWSVD and the time to reach
within 1 % of the best loss any solver found. ``--model DIR --fisher FILE`` use a fine-tuned
model and Fisher saved by a ``kedro run`` instead (``data/06_models/fine_tuned_model/<version>/
fine_tuned_model`` and ``data/04_feature/fisher_information.safetensors/<version>/
fisher_information.safetensors``); ``benchmarks/stopping.py`` measures the stopping rules on them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

from doc_sections import write_section  # noqa: E402  (benchmarks/ is the script directory)
from reviews import load_reviews  # noqa: E402

from weighted_lowrank.hf.batching import make_batches  # noqa: E402
from weighted_lowrank.hf.models import EMBEDDED_MODEL, load_base_model  # noqa: E402
from weighted_lowrank.lowrank.fisher import empirical_fisher  # noqa: E402
from weighted_lowrank.lowrank.objective import rank_for_budget  # noqa: E402
from weighted_lowrank.lowrank.solvers import factorize_batch  # noqa: E402
from weighted_lowrank.lowrank.targets import select_linear_modules  # noqa: E402

CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"
BENCHMARKS_PATH = REPO_ROOT / "docs" / "BENCHMARKS.md"

FINE_TUNE_EXAMPLES = 800
FISHER_EXAMPLES = 512
MAX_LENGTH = 64
SEED = 42


def _batches(frame: pd.DataFrame, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches in the frame's order (the cache in benchmarks/.cache was made with these)."""
    return make_batches(
        frame, tokenizer, batch_size=batch_size, max_length=MAX_LENGTH, bucket_by_length=False
    )


def fine_tune(frame: pd.DataFrame, epochs: int = 2, lr: float = 1e-4, batch_size: int = 32):
    """A short full fine-tune of the embedded model (AdamW, linear decay)."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    bundle = load_base_model(EMBEDDED_MODEL, num_labels=2)
    model = bundle.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(frame) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for epoch in range(epochs):
        shuffled = frame.sample(frac=1.0, random_state=SEED + epoch)
        for batch in _batches(shuffled, bundle.tokenizer, batch_size):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    model.eval()
    return bundle


def prepare_real_problem(
    refresh: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Fine-tuned weights and their importance, from the cache or computed (a few minutes)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    weights_path = CACHE_DIR / "fine_tuned_weights.safetensors"
    importance_path = CACHE_DIR / "importance.safetensors"
    if not refresh and weights_path.is_file() and importance_path.is_file():
        from safetensors import safe_open

        with safe_open(str(importance_path), "pt") as handle:
            source = handle.metadata().get("source", "unknown")
        return load_file(str(weights_path)), load_file(str(importance_path)), source
    reviews = load_reviews(FINE_TUNE_EXAMPLES + FISHER_EXAMPLES, SEED)
    started = time.perf_counter()
    bundle = fine_tune(reviews.iloc[:FINE_TUNE_EXAMPLES])
    print(f"fine-tuned on {FINE_TUNE_EXAMPLES} examples in {time.perf_counter() - started:.0f} s")
    fisher_frame = reviews.iloc[FINE_TUNE_EXAMPLES:]
    started = time.perf_counter()
    batches = _batches(fisher_frame, bundle.tokenizer, 16)
    importance = empirical_fisher(bundle.model, batches, mode="per_example")
    source = (
        "weighted_lowrank.lowrank.fisher.empirical_fisher per_example, "
        f"{len(fisher_frame)} examples"
    )
    print(f"importance ({source}) in {time.perf_counter() - started:.0f} s")
    modules = select_linear_modules(bundle.model)
    weights = {
        f"{name}.weight": m.weight.detach().clone().contiguous() for name, m in modules.items()
    }
    importance = {name: importance[name].detach().contiguous() for name in weights}
    save_file(weights, str(weights_path))
    save_file(importance, str(importance_path), metadata={"source": source})
    return weights, importance, source


def load_run_problem(
    model_dir: str | Path, fisher_path: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """The targeted weights of a saved fine-tuned model and their importance from a saved Fisher.

    ``model_dir`` is a Hugging Face directory (the pipeline's ``fine_tuned_model``),
    ``fisher_path`` the pipeline's ``fisher_information.safetensors`` ("<module>.weight" keys).
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    fisher = load_file(str(fisher_path))
    modules = select_linear_modules(model)
    weights = {
        f"{name}.weight": m.weight.detach().float().clone().contiguous()
        for name, m in modules.items()
    }
    missing = [name for name in weights if name not in fisher]
    if missing:
        raise ValueError(f"{fisher_path} has no importance for {missing[:3]} ({len(missing)})")
    importance = {name: fisher[name].detach().float().contiguous() for name in weights}
    source = f"model {model_dir}, Fisher {fisher_path}"
    return weights, importance, source


# ----------------------------------------------------------------------------- the benchmark

LAYER_TYPES = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")
ITERATIVE_BASELINES = ("adam", "sgd", "adam_sgd", "als", "em")


def layer_type(name: str) -> str:
    """Short type of an encoder Linear weight name."""
    for key, short in (
        ("attention.self.query", "query"),
        ("attention.self.key", "key"),
        ("attention.self.value", "value"),
        ("attention.output.dense", "attn.out"),
        ("intermediate.dense", "ffn.in"),
        ("output.dense", "ffn.out"),
    ):
        if key in name:
            return short
    return "other"


def select_layers(names: list[str], layers: str | None) -> list[str]:
    """Encoder layer indices ("0,5") or a substring/regex of the weight names; None = all."""
    if not layers:
        return names
    import re

    if all(part.strip().isdigit() for part in layers.split(",")):
        wanted = {int(part) for part in layers.split(",")}
        chosen = [n for n in names if int(re.search(r"layer\.(\d+)\.", n).group(1)) in wanted]
    else:
        pattern = re.compile(layers)
        chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ValueError(f"--layers {layers!r} selects no weight; names look like {names[0]!r}")
    return chosen


def synthetic_heavy_tailed(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Importance = Pareto(α=1.2) rows × Pareto columns × log-normal(σ=1.5) noise, per layer."""
    generator = torch.Generator().manual_seed(seed)
    importance = {}
    for name, weight in weights.items():
        out_features, in_features = weight.shape
        rows = torch.rand(out_features, generator=generator).clamp_min(1e-6) ** (-1 / 1.2)
        cols = torch.rand(in_features, generator=generator).clamp_min(1e-6) ** (-1 / 1.2)
        noise = torch.exp(1.5 * torch.randn(out_features, in_features, generator=generator))
        importance[name] = (rows[:, None] * cols[None, :] * noise).float()
    return importance


def run_solver(solver, names, weights, importance, budget, options):
    """One batched call over the selected layers; returns (results by name, wall seconds)."""
    ranks = [rank_for_budget(tuple(weights[n].shape), budget) for n in names]
    started = time.perf_counter()
    results = factorize_batch(
        [weights[n] for n in names], [importance[n] for n in names], ranks, solver=solver, **options
    )
    return dict(zip(names, results, strict=True)), time.perf_counter() - started


def time_to_within(history, target: float) -> float | None:
    """First time in a (seconds, loss) history at which the loss is <= target."""
    for seconds, loss in history:
        if loss <= target:
            return seconds
    return None


def benchmark_case(label, names, weights, importance, budget, args) -> dict:
    """All solvers on one (importance, budget) case; returns per-solver per-layer records."""
    cap = args.seconds
    runs: dict[str, tuple[dict, float]] = {}
    runs["svd"] = run_solver("svd", names, weights, importance, budget, {})
    for axis in ("in", "out", "both"):
        runs[f"fwsvd_{axis}"] = run_solver(
            "fwsvd", names, weights, importance, budget, {"axis": axis}
        )
    timings = []
    for _ in range(args.repeats):
        results, seconds = run_solver("tfwsvd", names, weights, importance, budget, {})
        timings.append(seconds)
    runs["tfwsvd"] = (results, statistics.median(timings))
    print(
        f"[{label} budget {budget}] tfwsvd wall seconds over {args.repeats} runs: "
        f"{', '.join(f'{t:.2f}' for t in timings)}",
        flush=True,
    )
    long_run = {"max_iters": 100000, "max_seconds": cap, "tol": 1e-9}
    runs["tfwsvd_converged"] = run_solver(
        "tfwsvd",
        names,
        weights,
        importance,
        budget,
        {"max_iters": 2000, "tol": 1e-9, "max_seconds": cap},
    )
    for solver in ITERATIVE_BASELINES:
        runs[solver] = run_solver(solver, names, weights, importance, budget, long_run)
        print(f"[{label} budget {budget}] {solver} done in {runs[solver][1]:.0f} s", flush=True)
    best = {n: min(results[n].loss for results, _ in runs.values()) for n in names}
    closed_best = {
        n: min(runs[f][0][n].loss for f in ("fwsvd_in", "fwsvd_out", "fwsvd_both")) for n in names
    }
    records = {}
    for solver, (results, seconds) in runs.items():
        per_layer = {}
        for n in names:
            result = results[n]
            per_layer[n] = {
                "rel_svd": result.loss / runs["svd"][0][n].loss,
                "rel_fwsvd": result.loss / closed_best[n],
                "gap_best": result.loss / best[n] - 1,
                "t1": time_to_within(result.history, best[n] * 1.01),
                "iterations": result.iterations,
                "info": result.info,
            }
        records[solver] = {"layers": per_layer, "seconds": seconds}
    return records


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, pattern="{:.4f}"):
    return "—" if value is None else pattern.format(value)


def render_case(label, budget, names, records) -> str:
    """Markdown tables for one case: solver summary, then per-layer-type medians."""
    lines = [
        f"### {label}, budget {budget} ({len(names)} layers)",
        "",
        "| solver | loss / SVD (median) | loss / best FWSVD (median) | worst gap to best | "
        "layers within 0.1 % of best | never above every FWSVD form | time to 1 % of best, median (s) | "
        "wall seconds (all layers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for solver, record in records.items():
        layers = record["layers"].values()
        within = sum(1 for r in layers if r["gap_best"] <= 1e-3)
        not_worse = sum(1 for r in layers if r["rel_fwsvd"] <= 1 + 1e-9)
        unreached = sum(1 for r in layers if r["t1"] is None)
        t1 = _median([r["t1"] for r in layers])
        t1_text = _fmt(t1, "{:.2f}") + (f" ({unreached} never)" if unreached else "")
        lines.append(
            f"| {solver} | {_fmt(_median([r['rel_svd'] for r in layers]))} | "
            f"{_fmt(_median([r['rel_fwsvd'] for r in layers]))} | "
            f"{100 * max(r['gap_best'] for r in layers):.3f} % | {within}/{len(names)} | "
            f"{not_worse}/{len(names)} | {t1_text} | {record['seconds']:.1f} |"
        )
    types = [t for t in LAYER_TYPES if any(layer_type(n) == t for n in names)]
    lines += [
        "",
        "Median loss / SVD per layer type (time to 1 % of best in brackets, seconds on the batched clock):",
        "",
        "| solver | " + " | ".join(types) + " |",
        "|---|" + "---|" * len(types),
    ]
    for solver, record in records.items():
        cells = []
        for t in types:
            subset = [r for n, r in record["layers"].items() if layer_type(n) == t]
            cells.append(
                f"{_fmt(_median([r['rel_svd'] for r in subset]))} "
                f"({_fmt(_median([r['t1'] for r in subset]), '{:.2f}')})"
            )
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    switches = [r["info"].get("switch_iteration") for r in records["adam_sgd"]["layers"].values()]
    switched = [s for s in switches if s is not None]
    sgd_lr = [r["info"].get("sgd_lr") for r in records["adam_sgd"]["layers"].values()]
    swats_lr = [r["info"].get("swats_lr") for r in records["adam_sgd"]["layers"].values()]
    clipped = sum(
        1
        for a, b in zip(sgd_lr, swats_lr, strict=True)
        if a is not None and b is not None and a < b
    )
    lines += [
        "",
        f"adam_sgd switched to SGD on {len(switched)}/{len(switches)} layers"
        + (
            f" (median switch iteration {statistics.median(switched):.0f}; the curvature bound "
            f"clipped the SWATS step on {clipped} of them)"
            if switched
            else ""
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.5,0.25", help="comma-separated parameter fractions")
    parser.add_argument(
        "--layers", default=None, help='encoder layer indices ("0,5") or a name regex'
    )
    parser.add_argument("--quick", action="store_true", help="layer 0 only, short caps (smoke run)")
    parser.add_argument(
        "--output",
        default=str(BENCHMARKS_PATH),
        help="markdown file whose solver section is replaced",
    )
    parser.add_argument(
        "--seconds", type=float, default=40.0, help="time cap per solver and layer group"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats of the default tfwsvd run"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--no-synthetic", action="store_true", help="skip the synthetic heavy-tailed case"
    )
    parser.add_argument(
        "--refresh", action="store_true", help="recompute the cached fine-tune and Fisher"
    )
    parser.add_argument(
        "--timing", action="store_true", help="only time the default tfwsvd (all selected layers)"
    )
    parser.add_argument(
        "--model", default=None, help="a saved fine-tuned model directory (with --fisher)"
    )
    parser.add_argument(
        "--fisher", default=None, help="a saved fisher_information.safetensors (with --model)"
    )
    args = parser.parse_args(argv)
    if (args.model is None) != (args.fisher is None):
        parser.error("--model and --fisher go together")
    if args.quick:
        args.layers = args.layers or "0"
        args.seconds = min(args.seconds, 3.0)
        args.repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if args.model is not None:
        weights, importance, source = load_run_problem(args.model, args.fisher)
    else:
        weights, importance, source = prepare_real_problem(refresh=args.refresh)
    names = select_layers(list(weights), args.layers)
    if args.timing:
        for budget in budgets:
            timings = [
                run_solver("tfwsvd", names, weights, importance, budget, {})[1]
                for _ in range(args.repeats)
            ]
            print(
                f"tfwsvd, {len(names)} layers, budget {budget}, {torch.get_num_threads()} threads: "
                f"median {statistics.median(timings):.2f} s over {len(timings)} runs "
                f"({', '.join(f'{t:.2f}' for t in timings)})",
                flush=True,
            )
        return 0
    command = "python benchmarks/solvers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    sections = [
        "## Solver benchmark (element-wise weighted low-rank)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {machine}; shared with other jobs while it ran, so timings are noisy "
        f"(tfwsvd wall time is the median of {args.repeats} runs).  ",
        (
            f"Model and importance: {source}.  "
            if args.model is not None
            else f"Model: all-MiniLM-L6-v2 fine-tuned for {FINE_TUNE_EXAMPLES} Rotten Tomatoes "
            f"examples × 2 epochs; importance: {source}.  "
        ),
        "Loss: Σ I (W − AB)² per layer; *best* = the lowest loss any solver reached on that layer; "
        f"iterative baselines and `tfwsvd_converged` ran up to {args.seconds:g} s per layer group "
        "(layers of equal shape share one batched run: 24 attention, 6 FFN-in, 6 FFN-out), "
        "`tfwsvd` with its defaults. Budget = fraction of each targeted layer's dense weight "
        "parameters kept (r·(out+in) vs out·in), rank = ⌊f·out·in/(out+in)⌋.",
        "",
    ]
    for budget in budgets:
        records = benchmark_case("real Fisher", names, weights, importance, budget, args)
        table = render_case("Real Fisher", budget, names, records)
        print(table, flush=True)
        sections.append(table)
    if not args.no_synthetic:
        synthetic = synthetic_heavy_tailed({n: weights[n] for n in names}, SEED)
        records = benchmark_case("synthetic", names, weights, synthetic, budgets[0], args)
        table = render_case(
            "Synthetic heavy-tailed importance (Pareto rows × Pareto columns × log-normal)",
            budgets[0],
            names,
            records,
        )
        print(table, flush=True)
        sections.append(table)
    output = Path(args.output)
    write_section(output, "solvers", "\n".join(sections), "benchmarks/solvers.py")
    print(f"wrote the solver section of {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
