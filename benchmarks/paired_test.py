"""Paired comparison of two rows of a run on the test split (exact McNemar test, bootstrap interval).

Run ``python benchmarks/paired_test.py [--version V] SOLVER_A SOLVER_B [--refined]``: compares
``<solver>`` rows (or ``refined.<solver>``, written by ``kedro run --pipelines refined`` or
``refinement``) of the latest run or of save version ``V`` — any two rows, where the run's own
report (``comparison.md``, "Paired tests") compares every row with ``fwsvd`` and ``svd`` only.
It reads their saved per-example predictions (``<row>.predictions``); for runs older than those,
it loads ``<row>.compressed_model`` through the project's catalog and predicts the test split.
It reports on how many sentences the two disagree (right vs wrong), who is right on those, the
two-sided exact McNemar p-value and the paired bootstrap 95 % interval of the accuracy
difference (``reporting.bootstrap_resamples`` / ``bootstrap_seed``), computed by
``weighted_lowrank.analysis.paired`` — the same code as the run's report.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
from kedro.io import DatasetError  # noqa: E402
from project_catalog import project_catalog  # noqa: E402  (benchmarks/ is the script directory)

from weighted_lowrank.analysis.paired import paired_comparison  # noqa: E402
from weighted_lowrank.analysis.run_history import REFINED_PREFIX  # noqa: E402
from weighted_lowrank.hf.training import predict_examples  # noqa: E402


def correct_per_example(catalog, row: str, test, max_length: int, batch_size: int) -> np.ndarray:
    """Whether row ``row`` got each test example right, in test-split order."""
    try:
        predictions = catalog.load(f"{row}.predictions").sort_values("id")
    except DatasetError:  # a run from before predictions were saved: predict again
        bundle = catalog.load(f"{row}.compressed_model")
        logits = predict_examples(
            bundle.model, bundle.tokenizer, test, max_length, batch_size
        ).logits
        return logits.argmax(axis=1) == test["label"].to_numpy()
    if not np.array_equal(predictions["label"].to_numpy(), test["label"].to_numpy()):
        raise SystemExit(f"{row}.predictions is not on the current test split")
    return (predictions["prediction"] == predictions["label"]).to_numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("solvers", nargs=2, help="two solver namespaces, e.g. fwsvd tfwsvd")
    parser.add_argument("--version", default=None, help="save version of the run (default: latest)")
    parser.add_argument("--refined", action="store_true", help="compare the refined models")
    args = parser.parse_args(argv)
    prefix = REFINED_PREFIX if args.refined else ""
    rows = [f"{prefix}{solver}" for solver in args.solvers]
    pinned = [f"{row}.{name}" for row in rows for name in ("predictions", "compressed_model")]

    catalog = project_catalog(dict.fromkeys(pinned, args.version) if args.version else None)
    test = catalog.load("test_split")
    max_length = int(catalog.load("params:model")["max_length"])
    batch_size = int(catalog.load("params:evaluation")["batch_size"])
    reporting = catalog.load("params:reporting")
    first, second = (
        correct_per_example(catalog, row, test, max_length, batch_size) for row in rows
    )
    result = paired_comparison(
        first, second, int(reporting["bootstrap_resamples"]), int(reporting["bootstrap_seed"])
    )
    a, b = args.solvers
    print(
        f"{prefix}<solver> version {args.version or 'latest'}, {result.n} test examples: accuracy "
        f"{a} {first.mean():.3f}, {b} {second.mean():.3f}; they disagree on "
        f"{result.disagreements} ({result.disagreements / result.n:.1%}): only {a} right on "
        f"{result.wins}, only {b} right on {result.losses}; exact McNemar p = "
        f"{result.p_value:.3f}; {a} − {b} = {result.diff:+.3f} "
        f"[{result.ci_low:+.3f}, {result.ci_high:+.3f}] (95 % paired bootstrap)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
