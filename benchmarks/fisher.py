"""Time the Fisher estimators on the default model and data: per-example vs minibatch vs bs-1 loop.

    python benchmarks/fisher.py --examples 1000 --repeats 3

The three estimators run interleaved (so a load spike on a shared machine hits all of them) on
the same length-bucketed batches; the table reports the median wall time of each and its ratio
to the minibatch estimator, plus the per-example result's relative error against the bs-1 loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
from reviews import load_reviews  # benchmarks/ is the script directory
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from weighted_lowrank.hf.batching import make_batches
from weighted_lowrank.hf.models import (
    EMBEDDED_MODEL,
    ModelBundle,
    load_base_model,
    resolve_model_source,
)
from weighted_lowrank.lowrank.fisher import empirical_fisher, validate_fisher
from weighted_lowrank.lowrank.risk import layer_statistics


def relative_error(estimate: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor ‖estimate − reference‖ / ‖reference‖."""
    return max(
        float((estimate[key] - reference[key]).norm() / reference[key].norm()) for key in reference
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--loop-repeats", type=int, default=None, help="bs-1 loop runs (default: --repeats)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--risk",
        action="store_true",
        help="also print how φ(W) of the per-example Fisher predicts SVD's loss vs FWSVD's",
    )
    parser.add_argument("--budget", type=float, default=0.5, help="budget of the --risk study")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process = CPU seconds of all threads: a work measure that survives a shared machine",
    )
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model source (embedded, dir, hub)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="same architecture and tokenizer, randomly initialised (a directory without weights)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    frame = load_reviews(args.examples, args.seed)
    if args.random_weights:
        # Timing depends on the architecture and the token counts, not on the weight values.
        source = resolve_model_source(args.model)
        torch.manual_seed(args.seed)
        config = AutoConfig.from_pretrained(source, num_labels=2)
        bundle = ModelBundle(
            model=AutoModelForSequenceClassification.from_config(config),
            tokenizer=AutoTokenizer.from_pretrained(source),
        )
    else:
        bundle = load_base_model(args.model, num_labels=2)
    batches = make_batches(
        frame, bundle.tokenizer, batch_size=args.batch_size, max_length=args.max_length
    )
    singles = make_batches(frame, bundle.tokenizer, batch_size=1, max_length=args.max_length)
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    padded_tokens = sum(batch["attention_mask"].numel() for batch in batches)

    estimators = {
        "minibatch": lambda: empirical_fisher(
            bundle.model, batches, mode="minibatch", device=args.device
        ),
        "per_example": lambda: empirical_fisher(
            bundle.model, batches, mode="per_example", device=args.device
        ),
        "bs1_loop": lambda: empirical_fisher(
            bundle.model, singles, mode="minibatch", device=args.device
        ),
    }
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    loop_repeats = args.repeats if args.loop_repeats is None else args.loop_repeats
    seconds: dict[str, list[float]] = {name: [] for name in estimators}
    results = {}
    for repeat in range(max(args.repeats, loop_repeats)):
        for name, estimate in estimators.items():
            if repeat >= (loop_repeats if name == "bs1_loop" else args.repeats):
                continue
            start = clock()
            results[name] = estimate()
            seconds[name].append(clock() - start)
            print(f"run {repeat + 1} {name}: {seconds[name][-1]:.1f} s", flush=True)

    base = statistics.median(seconds["minibatch"])
    print(
        f"\n{args.examples} examples, batch size {args.batch_size}, max_length {args.max_length}, "
        f"{args.clock} clock, device {args.device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"real/padded tokens {real_tokens}/{padded_tokens}"
    )
    print(f"| estimator | median {args.clock} s | runs (s) | × minibatch |")
    print("|---|---|---|---|")
    for name, runs in seconds.items():
        if not runs:
            continue
        median = statistics.median(runs)
        listed = ", ".join(f"{run:.1f}" for run in runs)
        print(f"| {name} | {median:.1f} | {listed} | {median / base:.2f} |")
    if "bs1_loop" in results:
        print(
            "per-example vs bs-1 loop: max relative error "
            f"{relative_error(results['per_example'], results['bs1_loop']):.2e}"
        )
    if args.risk:
        print_risk_study(bundle.model, results["per_example"], args.budget)


def print_risk_study(model, fisher: dict[str, torch.Tensor], budget: float) -> None:
    """How well φ and the other cheap statistics predict where SVD loses to FWSVD."""
    modules = validate_fisher(model, fisher)
    weights = {f"{name}.weight": module.weight.detach() for name, module in modules.items()}
    table = pd.DataFrame(layer_statistics(weights, fisher, budget=budget))
    print(f"\nrisk study at budget {budget}: Spearman correlation with svd_loss_rel_fwsvd")
    for column in ("phi", "top_share", "max_to_mean", "svd_error_alignment"):
        correlation = table[column].rank().corr(table["svd_loss_rel_fwsvd"].rank())
        print(f"  {column}: {correlation:.3f}")
    hurt = table["svd_loss_rel_fwsvd"] >= 2.0
    print(f"layers where SVD's weighted loss is ≥ 2× FWSVD's: {int(hurt.sum())} of {len(table)}")
    print("| φ threshold | layers flagged | accuracy | precision | recall |")
    print("|---|---|---|---|---|")
    for threshold in (3, 10, 20, 50, 100, 200):
        flagged = table["phi"] >= threshold
        precision = hurt[flagged].mean() if flagged.any() else float("nan")
        recall = flagged[hurt].mean() if hurt.any() else float("nan")
        accuracy = (flagged == hurt).mean()
        print(
            f"| {threshold} | {int(flagged.sum())} | {accuracy:.2f} | {precision:.2f} | {recall:.2f} |"
        )
    columns = ["module", "phi", "top_share", "svd_loss_rel_fwsvd", "svd_error_alignment"]
    print(table[columns].sort_values("phi").round(3).to_string(index=False))


if __name__ == "__main__":
    main()
