"""Element-wise solvers on a better weight (issue 12, deliverable 3): do they help?

For every saved fine-tuned model (one per seed of a sweep) with a Fisher and calibration
statistics of the same fingerprint, at each budget, the test accuracy of

- ``kfwsvd``                 the Kronecker-factored closed form;
- ``tfwsvd from kfwsvd``     the element-wise (diagonal Fisher) solver started there;
- ``fwsvd on diag(G⊗A)``     the element-wise objective with the Kronecker model's diagonal
                             (rank one, so two-sided FWSVD is its exact minimiser);
- ``fwsvd``, ``tfwsvd``      the diagonal-Fisher references;

each paired with ``kfwsvd`` on the same test sentences (exact McNemar p).

    python benchmarks/hybrid.py [--budgets 0.5 0.3] [--models VERSION ...] [--write]

``--models`` limits the run to these ``fine_tuned_model`` versions (all matched ones by default;
they must have been fine-tuned on the task of the current ``test_split``).

``--write`` puts the table between the ``hybrid`` markers of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_sections import write_section  # noqa: E402
from project_catalog import REPO_ROOT, project_catalog  # noqa: E402

from weighted_lowrank.analysis.paired import (  # noqa: E402
    discordant_counts,
    mcnemar_exact_p,
)
from weighted_lowrank.hf.training import predict_examples  # noqa: E402
from weighted_lowrank.lowrank.compression import compress_model  # noqa: E402
from weighted_lowrank.lowrank.objective import weighted_loss  # noqa: E402
from weighted_lowrank.pipelines.reporting.nodes import markdown_table  # noqa: E402

#: (row name, solver, options, which importance: "fisher" or "kronecker_diagonal").
VARIANTS = (
    ("kfwsvd", "kfwsvd", {}, "fisher"),
    ("tfwsvd from kfwsvd", "tfwsvd", {"init": "kfwsvd"}, "fisher"),
    ("fwsvd on diag(G⊗A)", "fwsvd", {}, "kronecker_diagonal"),
    ("fwsvd", "fwsvd", {}, "fisher"),
    ("tfwsvd", "tfwsvd", {}, "fisher"),
)


def kronecker_diagonal(statistics: dict[str, torch.Tensor], names: list[str]) -> dict:
    """``{"<module>.weight": G_ii A_jj}``: the diagonal of the Kronecker model of the Fisher."""
    return {
        f"{name}.weight": torch.outer(
            statistics[f"{name}.output_moment"].diagonal(),
            statistics[f"{name}.input_moment"].diagonal(),
        ).clamp_min(0)
        for name in names
    }


def matched_versions(catalog) -> list[tuple[str, str, str, str]]:
    """(fingerprint, model, fisher, calibration versions) for every model with both features."""
    datasets = {
        name: catalog.get(name)
        for name in ("fine_tuned_model", "fisher_information", "calibration_statistics")
    }

    def by_fingerprint(name: str) -> dict[str, str]:
        dataset = datasets[name]
        root = Path(dataset._filepath)
        versions = sorted(path.name for path in root.iterdir()) if root.is_dir() else []
        found = {}
        for version in versions:
            fingerprint = dataset.fingerprint_at(version)
            if fingerprint is not None:
                found[fingerprint] = version  # the latest version of each fingerprint wins
        return found

    models, fishers, statistics = (by_fingerprint(name) for name in datasets)
    return [
        (fingerprint, version, fishers[fingerprint], statistics[fingerprint])
        for fingerprint, version in models.items()
        if fingerprint in fishers and fingerprint in statistics
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--models", nargs="+", default=None, help="fine_tuned_model versions")
    parser.add_argument("--write", action="store_true", help="write docs/RESULTS.md's section")
    arguments = parser.parse_args()
    catalog = project_catalog()
    test_split = catalog.load("test_split")
    params = catalog.load("parameters")
    max_length = params["model"]["max_length"]
    rows = []
    matched = matched_versions(catalog)
    if arguments.models is not None:
        unknown = sorted(set(arguments.models) - {version for _, version, _, _ in matched})
        if unknown:
            raise SystemExit(f"--models {unknown} have no Fisher and statistics of their own")
        matched = [entry for entry in matched if entry[1] in arguments.models]
    for fingerprint, model_version, fisher_version, statistics_version in matched:
        pinned = project_catalog(
            {
                "fine_tuned_model": model_version,
                "fisher_information": fisher_version,
                "calibration_statistics": statistics_version,
            }
        )
        bundle = pinned.load("fine_tuned_model")
        fisher = pinned.load("fisher_information")["tensors"]
        statistics = pinned.load("calibration_statistics")["tensors"]
        names = [key[: -len(".weight")] for key in fisher]
        importances = {
            "fisher": fisher,
            "kronecker_diagonal": kronecker_diagonal(statistics, names),
        }
        labels = test_split["label"].to_numpy()
        for budget in arguments.budgets:
            correct = {}
            for row, solver, options, importance in VARIANTS:
                model, results = compress_model(
                    bundle.model,
                    importances[importance],
                    budget,
                    solver,
                    names,
                    statistics=statistics,
                    seed=0,
                    **options,
                )
                predictions = predict_examples(model, bundle.tokenizer, test_split, max_length)
                correct[row] = predictions.logits.argmax(axis=1) == labels
                wins, losses = discordant_counts(correct[row], correct["kfwsvd"])
                rows.append(
                    {
                        "model": f"{model_version} ({fingerprint[:8]})",
                        "budget": budget,
                        "variant": row,
                        "accuracy": float(correct[row].mean()),
                        "minus_kfwsvd": float(correct[row].mean() - correct["kfwsvd"].mean()),
                        "mcnemar_p": mcnemar_exact_p(wins, losses),
                        # Always the diagonal Fisher loss, whichever importance the solver used.
                        "diagonal_fisher_loss": sum(
                            weighted_loss(
                                bundle.model.get_submodule(name).weight,
                                fisher[f"{name}.weight"],
                                result.left,
                                result.right,
                            )
                            for name, result in results.items()
                        ),
                    }
                )
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    summary = (
        table.groupby(["budget", "variant"], sort=False)
        .agg(
            accuracy_mean=("accuracy", "mean"),
            minus_kfwsvd_mean=("minus_kfwsvd", "mean"),
            ahead_of_kfwsvd=("minus_kfwsvd", lambda d: f"{int(np.sum(d > 0))}/{len(d)}"),
            models=("accuracy", "size"),
        )
        .reset_index()
    )
    text = (
        "Per model (one fine-tune per seed):\n\n"
        + markdown_table(table)
        + "\n\nMean over models:\n\n"
        + markdown_table(summary)
        + "\n"
    )
    print(text)
    if arguments.write:
        write_section(REPO_ROOT / "docs/RESULTS.md", "hybrid", text, "benchmarks/hybrid.py")


if __name__ == "__main__":
    main()
