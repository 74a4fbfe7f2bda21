"""Paired comparison of two compressed models on the test split (exact McNemar test).

Run ``python benchmarks/paired_test.py [--version V] SOLVER_A SOLVER_B [--refined]``: loads
``<solver>.compressed_model`` (or ``refined.<solver>.compressed_model``, written by ``kedro run
--pipelines refined`` or ``refinement``) of the latest run or of save version ``V`` through the
project's catalog, predicts the test split with both and reports on how many
sentences they disagree, who is right on those, and the two-sided exact McNemar p-value (a
binomial test on the discordant pairs). Accuracy differences between solvers are paired: the
models see the same sentences, so this is the test that says whether a gap is noise.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

from project_catalog import project_catalog  # noqa: E402  (benchmarks/ is the script directory)
from scipy import stats  # noqa: E402

from weighted_lowrank.pipelines.reporting.run_history import REFINED_PREFIX  # noqa: E402
from weighted_lowrank.training import predict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("solvers", nargs=2, help="two solver namespaces, e.g. fwsvd tfwsvd")
    parser.add_argument("--version", default=None, help="save version of the run (default: latest)")
    parser.add_argument("--refined", action="store_true", help="compare the refined models")
    args = parser.parse_args(argv)
    prefix = REFINED_PREFIX if args.refined else ""
    kind = f"{prefix}<solver>.compressed_model"
    names = [f"{prefix}{solver}.compressed_model" for solver in args.solvers]

    catalog = project_catalog(dict.fromkeys(names, args.version) if args.version else None)
    test = catalog.load("test_split")
    max_length = int(catalog.load("params:model")["max_length"])
    batch_size = int(catalog.load("params:evaluation")["batch_size"])
    correct = []
    for name in names:
        bundle = catalog.load(name)
        logits, _ = predict(bundle.model, bundle.tokenizer, test, max_length, batch_size)
        correct.append(logits.argmax(axis=1) == test["label"].to_numpy())
    first, second = correct
    only_first, only_second = int((first & ~second).sum()), int((~first & second).sum())
    discordant = only_first + only_second
    p_value = stats.binomtest(only_first, discordant).pvalue if discordant else 1.0
    a, b = args.solvers
    print(
        f"{kind} version {args.version or 'latest'}, {len(test)} test examples: accuracy "
        f"{a} {first.mean():.3f}, {b} {second.mean():.3f}; they disagree on {discordant} "
        f"({discordant / len(test):.1%}): only {a} right on {only_first}, only {b} right on "
        f"{only_second}; exact McNemar p = {p_value:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
