"""Fine-tuning after compression: which parameters to train, and the dense control.

Run ``python benchmarks/refinement.py`` after a ``kedro run`` (it loads the latest
``fine_tuned_model``, splits and ``<solver>.compressed_model`` through the project's catalog and
the ``refinement`` parameters). For each ``--solvers`` model it refines with every
``--trainable`` choice and scores the test split; ``dense`` trains the uncompressed fine-tuned
model for the same epochs with the same loop — the control that says how much of a refined
model's gain is compression recovered and how much is just more training. Writes the
``refinement`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

from doc_sections import write_section  # noqa: E402  (benchmarks/ is the script directory)
from project_catalog import project_catalog  # noqa: E402

from weighted_lowrank.hf.models import ModelBundle  # noqa: E402
from weighted_lowrank.hf.training import evaluate_classifier, train_classifier  # noqa: E402
from weighted_lowrank.kedro_glue.parameters import parse_parameters  # noqa: E402
from weighted_lowrank.lowrank.devices import resolve_device  # noqa: E402
from weighted_lowrank.lowrank.layer import lowrank_modules  # noqa: E402


def score(bundle: ModelBundle, frame, max_length: int, evaluation) -> dict[str, float]:
    """Task metrics and ``test_loss`` of ``bundle`` on ``frame``, as the evaluation node scores."""
    device = resolve_device(evaluation.device)
    metrics = evaluate_classifier(
        bundle.model, bundle.tokenizer, frame, max_length, evaluation.batch_size, device
    )
    bundle.model.to("cpu")
    return {**metrics, "test_loss": metrics.pop("loss")}


def refined(bundle: ModelBundle, trainable: str, train, validation, options, device) -> ModelBundle:
    """A copy of ``bundle`` fine-tuned as the refinement node does: every parameter
    (``trainable="all"``) or only the low-rank factors (``"factors"``)."""
    network = copy.deepcopy(bundle.model)
    factors = {id(p) for module in lowrank_modules(network).values() for p in module.parameters()}
    for parameter in network.parameters():
        parameter.requires_grad_(trainable == "all" or id(parameter) in factors)
    train_classifier(network, bundle.tokenizer, train, validation, options, device, progress=False)
    network.requires_grad_(True).to("cpu")
    return ModelBundle(network, bundle.tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", default="svd,tfwsvd", help="comma-separated namespaces")
    parser.add_argument("--trainable", default="all,factors", help="comma-separated choices")
    parser.add_argument("--epochs", type=int, default=None, help="default: refinement.epochs")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--version",
        default=None,
        help="load the compressed models saved by this run (a version directory name under "
        "data/06_models/compressed/<solver>/); default: the latest",
    )
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    solvers = args.solvers.split(",")
    versions = {f"{solver}.compressed_model": args.version for solver in solvers}
    catalog = project_catalog(versions if args.version else None)
    # The typed blocks the nodes receive in a run (checked as at the start of a run).
    typed = parse_parameters(catalog.load("parameters"))
    refinement = typed["params:refinement"]
    model_params, evaluation = typed["params:model"], typed["params:evaluation"]
    seed, device = typed["params:seed"], typed["params:device"]
    train, validation, test = (
        catalog.load(name) for name in ("train_split", "validation_split", "test_split")
    )
    dense = catalog.load("fine_tuned_model")
    compressed = {solver: catalog.load(f"{solver}.compressed_model") for solver in solvers}
    if args.epochs:
        refinement = refinement.model_copy(update={"epochs": args.epochs})
    max_length = model_params.max_length
    layers = lowrank_modules(next(iter(compressed.values())).model).values()
    kept = sum(m.rank * (m.in_features + m.out_features) for m in layers) / sum(
        m.in_features * m.out_features for m in layers
    )
    options = refinement.training_options(max_length, seed)

    rows = []
    before = score(dense, test, max_length, evaluation)
    started = time.perf_counter()
    control = ModelBundle(copy.deepcopy(dense.model), dense.tokenizer)
    train_classifier(control.model, control.tokenizer, train, validation, options, progress=False)
    control.model.to("cpu")
    after = score(control, test, max_length, evaluation)
    rows.append(("dense (control)", "all", before, after, time.perf_counter() - started))
    for solver, bundle in compressed.items():
        before = score(bundle, test, max_length, evaluation)
        for trainable in args.trainable.split(","):
            started = time.perf_counter()
            model = refined(bundle, trainable, train, validation, options, resolve_device(device))
            after = score(model, test, max_length, evaluation)
            rows.append((solver, trainable, before, after, time.perf_counter() - started))
            print(rows[-1][:2], before["accuracy"], after["accuracy"], flush=True)

    metric = "accuracy" if "accuracy" in before else "pearson"
    lines = [
        f"`python benchmarks/refinement.py --solvers {args.solvers} --trainable "
        f"{args.trainable}{f' --version {args.version}' if args.version else ''}` on {platform.node()}, {dt.date.today()}, torch threads "
        f"{torch.get_num_threads()}; compressed models keeping {kept:.3f} of the targeted weights, "
        f"{options.epochs} epoch(s), learning rate {options.learning_rate:g}, test split "
        f"({len(test)} examples).",
        "",
        f"| model | trained | test {metric} before | after | test loss before | after | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, trainable, before, after, seconds in rows:
        lines.append(
            f"| {name} | {trainable} | {before[metric]:.3f} | {after[metric]:.3f} | "
            f"{before['test_loss']:.3f} | {after['test_loss']:.3f} | {seconds:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    write_section(Path(args.output), "refinement", text, "benchmarks/refinement.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
