"""Time the Fisher pass with and without the calibration statistics (issue 12: ≤ 1.3× minibatch).

    python benchmarks/calibration_pass.py --repeats 3 --check

Model and data as the default run's ``estimate_fisher`` node sees them: the latest
``fine_tuned_model`` and ``train_split`` of the project's catalog, a seeded sample of
``--examples`` rows (``DataFrame.sample(random_state=--seed)``, as ``select_fisher_examples``),
length-bucketed batches of ``--batch-size`` at ``--max-length``. Without a fine-tuned model
(``--embedded``) the embedded MiniLM with a fresh 2-class head and the raw Rotten Tomatoes
snippets are used instead: timing depends on the shapes and token counts, not on the weights.

The variants run interleaved (a load spike on a shared machine hits all of them); the table
reports the median wall time of each, its ratio to the minibatch Fisher alone, the wall time
spent inside the statistics and inside the per-example products and their squares, and the
same for CPU seconds of all threads (a work measure that a shared machine disturbs less).
``--check`` also compares the statistics with a float64 reference pass.
A variant name ending in ``@ref`` runs the pass of ``--reference-commit`` (its ``fisher.py`` and
``calibration.py``; default: the commit before issue 15) instead of the working tree's, so
before and after are timed side by side. ``@bf16`` runs the whole pass with oneDNN's bfloat16
math for float32 matrix products (``torch.backends.mkldnn.matmul.fp32_precision``: float32 in
and out, bfloat16 products, AMX where the CPU has it), ``@bf16-grams`` only the products of the
Gram matrices A and G; both print their largest relative error against the same variant without
the tag, so the speed a lower-precision statistic would buy is measured with what it costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from per_example_products import bf16_matmul, in_bf16  # benchmarks/ is the script directory
from transformers.utils import logging as hf_logging

from weighted_lowrank.hf.batching import make_batches
from weighted_lowrank.lowrank import calibration, fisher
from weighted_lowrank.lowrank.calibration import CALIBRATION_STATISTICS, statistic_key
from weighted_lowrank.lowrank.fisher import _prepare_batch, calibrate
from weighted_lowrank.lowrank.targets import select_linear_modules

#: name: (Fisher mode, statistics)
VARIANTS = {
    "minibatch": ("minibatch", ()),
    "per_example": ("per_example", ()),
    "per_example+all": ("per_example", CALIBRATION_STATISTICS),
    "minibatch+all": ("minibatch", CALIBRATION_STATISTICS),
    "per_example+A+absx": ("per_example", ("input_moment", "input_abs_mean")),
    "per_example+G": ("per_example", ("output_moment",)),
}


#: variant tags after "@": the pass of the reference commit, or bfloat16 products (module docstring)
TAGS = ("ref", "bf16", "bf16-grams")


@contextmanager
def bf16_grams():
    """Only the Gram products of the statistics (``calibration._Gram.add``) in bfloat16."""
    exact_add = calibration._Gram.add
    calibration._Gram.add = in_bf16(exact_add)
    try:
        yield
    finally:
        calibration._Gram.add = exact_add


@contextmanager
def timed_products(seconds: list[float]):
    """Add the wall time inside the per-example products and squares (``fisher.
    _PerExampleAccumulator.accumulate``, the working tree's pass only) to ``seconds[0]``."""
    accumulate = fisher._PerExampleAccumulator.accumulate

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return accumulate(self, *args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    fisher._PerExampleAccumulator.accumulate = timed
    try:
        yield
    finally:
        fisher._PerExampleAccumulator.accumulate = accumulate


def split_variant(name: str) -> tuple[str, str | None]:
    """(variant, tag) of ``"<variant>[@<tag>]"``."""
    base, _, tag = name.partition("@")
    if base not in VARIANTS or (tag and tag not in TAGS):
        raise SystemExit(f"unknown variant {name!r}: expected one of {list(VARIANTS)}, tags {TAGS}")
    return base, tag or None


def largest_relative_error(tensors: dict, exact: dict) -> float:
    """Largest Frobenius-relative difference of matching tensors."""
    return max(
        float((tensors[key].double() - exact[key].double()).norm() / exact[key].double().norm())
        for key in exact
    )


def reference_calibrate(commit: str):
    """``calibrate`` of ``commit``: its fisher.py importing its own calibration.py."""
    from commit_modules import module_at_commit  # benchmarks/ is the script directory

    key = "weighted_lowrank.lowrank.calibration"
    current = sys.modules[key]
    sys.modules[key] = module_at_commit(
        commit, "src/weighted_lowrank/lowrank/calibration.py", "calibration"
    )
    try:
        return module_at_commit(
            commit, "src/weighted_lowrank/lowrank/fisher.py", "fisher"
        ).calibrate
    finally:
        sys.modules[key] = current


def load_model_and_examples(args):
    """(bundle, frame, description) of the default run's model and Fisher examples."""
    if args.model is not None:
        import pandas as pd

        from weighted_lowrank.hf.models import load_base_model

        config = __import__("json").loads((Path(args.model) / "config.json").read_text())
        bundle = load_base_model(args.model, num_labels=len(config["id2label"]), fresh_head=False)
        split = pd.read_parquet(args.train_split)
        frame = split.sample(n=min(args.examples, len(split)), random_state=args.seed)
        return bundle, frame.reset_index(drop=True), f"{args.model}, {args.train_split}"
    if not args.embedded:
        from project_catalog import project_catalog  # benchmarks/ is the script directory

        catalog = project_catalog()
        bundle = catalog.load("fine_tuned_model")
        split = catalog.load("train_split")
        frame = split.sample(n=min(args.examples, len(split)), random_state=args.seed)
        return bundle, frame.reset_index(drop=True), "fine_tuned_model (latest), train_split"
    from reviews import load_reviews

    from weighted_lowrank.hf.models import EMBEDDED_MODEL, load_base_model

    bundle = load_base_model(EMBEDDED_MODEL, num_labels=2)
    return bundle, load_reviews(args.examples, args.seed), "embedded MiniLM, raw reviews"


def float64_reference(model, batches, device) -> dict[str, torch.Tensor]:
    """A, G and |x| with float64 products of the same float32 activations and gradients."""
    modules = select_linear_modules(model)
    sums: dict[str, torch.Tensor] = {}
    captured: dict[str, list] = {}
    handles = [
        module.register_forward_hook(
            lambda _, args, output, name=name: captured.setdefault(name, []).append(
                (args[0].detach(), output)
            )
        )
        for name, module in modules.items()
    ]
    model.to(device).eval()
    tokens = examples = 0
    try:
        for index, batch in enumerate(batches):
            inputs, labels = _prepare_batch(batch, index, device)
            captured.clear()
            loss = torch.nn.functional.cross_entropy(
                model(**inputs).logits, labels, reduction="sum"
            )
            outputs = [output for name in modules for _, output in captured[name]]
            gradients = iter(torch.autograd.grad(loss, outputs))
            mask = inputs["attention_mask"].reshape(-1).bool()
            for name in modules:
                for x, _ in captured[name]:
                    g = next(gradients)
                    g = g.reshape(-1, g.shape[-1]).double()
                    rows = x.reshape(-1, x.shape[-1])[mask].double()
                    add(sums, statistic_key(name, "input_moment"), rows.t() @ rows)
                    add(sums, statistic_key(name, "input_abs_mean"), rows.abs().sum(0))
                    add(sums, statistic_key(name, "output_moment"), g.t() @ g)
            tokens += int(mask.sum())
            examples += labels.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return {
        key: total / (examples if key.endswith("output_moment") else tokens)
        for key, total in sums.items()
    }


def add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42, help="the run's seed (conf/base)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--embedded", action="store_true", help="no fine-tuned model: see above")
    parser.add_argument(
        "--model", default=None, help="a fine-tuned model directory instead of the catalog's"
    )
    parser.add_argument(
        "--train-split", default=None, help="the train_split parquet that goes with --model"
    )
    parser.add_argument(
        "--variants",
        default="minibatch,per_example,per_example+all,minibatch+all",
        help=f"comma-separated, from {list(VARIANTS)}, each optionally @ one of {TAGS}",
    )
    parser.add_argument("--check", action="store_true", help="accuracy against float64 products")
    parser.add_argument(
        "--reference-commit", default="df7a07e", help="the pass that '@ref' variants run"
    )
    args = parser.parse_args()
    if (args.model is None) != (args.train_split is None):
        parser.error("--model and --train-split go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    bundle, frame, source = load_model_and_examples(args)
    batches = make_batches(
        frame, bundle.tokenizer, batch_size=args.batch_size, max_length=args.max_length
    )
    real = sum(int(batch["attention_mask"].sum()) for batch in batches)
    padded = sum(batch["attention_mask"].numel() for batch in batches)
    chosen = [name.strip() for name in args.variants.split(",")]
    parts = {name: split_variant(name) for name in chosen}
    wall: dict[str, list[float]] = {name: [] for name in chosen}
    cpu: dict[str, list[float]] = {name: [] for name in chosen}
    inside: dict[str, list[float]] = {name: [] for name in chosen}
    products: dict[str, list[float]] = {name: [] for name in chosen}
    loads = []
    results = {}
    reference = (
        reference_calibrate(args.reference_commit)
        if any(tag == "ref" for _, tag in parts.values())
        else None
    )
    precision = {"bf16": bf16_matmul, "bf16-grams": bf16_grams}
    for repeat in range(args.repeats):
        for name in chosen:
            base, tag = parts[name]
            mode, wanted = VARIANTS[base]
            run = reference if tag == "ref" else calibrate
            loads.append(os.getloadavg()[0])
            products_seconds = [0.0]
            with precision.get(tag, nullcontext)(), timed_products(products_seconds):
                start, start_cpu = time.perf_counter(), time.process_time()
                results[name] = run(
                    bundle.model, batches, mode=mode, statistics=wanted, device=args.device
                )
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            inside[name].append(results[name].statistics_seconds)
            products[name].append(products_seconds[0])
            print(
                f"run {repeat + 1} {name}: {wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU",
                flush=True,
            )

    print(
        f"\n{source}: {len(frame)} examples, batch size {args.batch_size}, max_length "
        f"{args.max_length}, device {args.device}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; real/padded tokens {real}/{padded}; load average at the "
        f"start of the runs {min(loads):.1f}–{max(loads):.1f}"
    )
    print(
        "| pass | median wall s | runs (s) | × minibatch | statistics wall s | "
        "per-example products wall s | "
        "median CPU s (all threads) | runs (s) | × minibatch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in chosen:
        cells = [name]
        for clock in (wall, cpu):
            median = statistics.median(clock[name])
            base = statistics.median(clock["minibatch"]) if "minibatch" in clock else None
            cells += [f"{median:.1f}", ", ".join(f"{run:.1f}" for run in clock[name])]
            cells.append(f"{median / base:.2f}" if base else "—")
            if clock is wall:
                cells.append(f"{statistics.median(inside[name]):.1f}")
                cells.append(f"{statistics.median(products[name]):.1f}")
        print("| " + " | ".join(cells) + " |")
    for name, (base, tag) in parts.items():
        if tag in precision and base in results:
            exact, approximate = results[base], results[name]
            fisher_error = largest_relative_error(approximate.fisher, exact.fisher)
            print(
                f"{name}: largest relative error (Frobenius, per tensor) against {base}: "
                f"Fisher {fisher_error:.1e}",
                end="",
            )
            for statistic in sorted({key.rsplit(".", 1)[1] for key in exact.statistics}):
                keys = {k: v for k, v in exact.statistics.items() if k.endswith(statistic)}
                error = largest_relative_error(approximate.statistics, keys)
                print(f", {statistic} {error:.1e}", end="")
            print()
    if args.check:
        complete = next(
            (
                result
                for name, result in results.items()
                if parts[name][1] is None and len(VARIANTS[parts[name][0]][1]) == 3
            ),
            None,
        )
        if complete is not None:
            reference = float64_reference(bundle.model, batches, torch.device(args.device))
            errors = {
                statistic: largest_relative_error(
                    complete.statistics,
                    {
                        key: value.cpu()
                        for key, value in reference.items()
                        if key.endswith(statistic)
                    },
                )
                for statistic in CALIBRATION_STATISTICS
            }
            print("max relative error (Frobenius, per tensor) vs float64 products:", errors)


if __name__ == "__main__":
    main()
