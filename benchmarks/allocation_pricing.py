"""Global allocation priced by each solver's own quadratic vs by the Kronecker model, against uniform.

    python benchmarks/allocation_pricing.py --own sqlite:///allocation_own.db \
        --kronecker sqlite:///allocation_kronecker.db [--write]

``--own``: a store of ``benchmarks/allocation_sweep.sh`` run with ``CURVE_LOSS_MODEL=own`` (it
holds the uniform and the own-priced global runs); ``--kronecker``: one with
``CURVE_LOSS_MODEL=kronecker`` (its global runs; its uniform runs, if any, are the same models as
the other store's). Prints, per solver and budget, the test accuracy of the three (mean over the
seeds both stores hold), each global − uniform paired by seed with the exact McNemar p per seed
(from the child runs' predictions artifacts). ``--write`` puts the table between the
``allocation_pricing`` markers of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from doc_sections import write_section  # benchmarks/ is the script directory
from mlflow.tracking import MlflowClient

from weighted_lowrank.analysis.paired import (
    discordant_counts,
    mcnemar_exact_p,
)
from weighted_lowrank.analysis.run_history import (
    _correct_on_one_test_set,
    _logged_predictions,
    child_runs,
    latest_per_seed,
    markdown_table,
    task_metric,
)

ARMS = ("uniform", "global (own)", "global (kronecker)")


def arms(own_uri: str, kronecker_uri: str) -> pd.DataFrame:
    """One row per (solver, budget, seed, arm) with the task metric, the run id and its store."""
    own = latest_per_seed(child_runs(own_uri)).assign(store=own_uri)
    kronecker = latest_per_seed(child_runs(kronecker_uri)).assign(store=kronecker_uri)
    own = own[own["solver"] != "dense"]
    own = own.assign(arm=own["allocation"].map({"uniform": ARMS[0], "global": ARMS[1]}))
    kronecker = kronecker[kronecker["allocation"] == "global"].assign(arm=ARMS[2])
    return pd.concat([own, kronecker], ignore_index=True).dropna(subset=["arm"])


def pricing_table(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (solver, budget): the arms' mean metric over the seeds every arm has, and each global
    arm − uniform per seed with McNemar p."""
    wide = table.pivot_table(index=["solver", "budget", "seed"], columns="arm", values=metric)
    wide = wide.dropna(subset=[arm for arm in ARMS if arm in wide.columns])
    losses = table.pivot_table(
        index=["solver", "budget", "seed"], columns="arm", values="test_loss"
    ).loc[wide.index]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for (solver, budget), group in wide.groupby(level=["solver", "budget"]):
            row = {"solver": solver, "budget": budget, "seeds": len(group)}
            loss = losses.loc[group.index]
            for arm in ARMS:
                row[arm] = f"{group[arm].mean():.3f} ({loss[arm].mean():.3f})"
            for arm in ARMS[1:]:
                cells = []
                for (_, _, seed), values in group.iterrows():
                    p = _mcnemar(table, solver, budget, seed, arm, Path(directory))
                    cells.append(f"{seed}: {values[arm] - values[ARMS[0]]:+.3f} (p {p:.2g})")
                row[f"{arm} − uniform"] = ", ".join(cells)
            rows.append(row)
    return pd.DataFrame(rows)


def _mcnemar(table, solver, budget, seed, arm, directory: Path) -> float:
    predictions = []
    for side in (arm, ARMS[0]):
        match = table[
            (table["solver"] == solver)
            & (table["budget"] == budget)
            & (table["seed"] == seed)
            & (table["arm"] == side)
        ].iloc[0]
        client = MlflowClient(match["store"])
        predictions.append(_logged_predictions(client, match["run_id"], directory))
    correct = _correct_on_one_test_set(*predictions)
    if correct is None:
        return float("nan")
    return mcnemar_exact_p(*discordant_counts(*correct))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--own", required=True)
    parser.add_argument("--kronecker", required=True)
    parser.add_argument("--write", action="store_true")
    arguments = parser.parse_args()
    table = arms(arguments.own, arguments.kronecker)
    metric = task_metric(table)
    text = (
        f"Test {metric} (test loss), mean over the seeds of every arm; per seed: {metric} of "
        "global − uniform (exact McNemar p on the shared test set).\n\n"
        + markdown_table(pricing_table(table, metric))
        + "\n"
    )
    print(text)
    if arguments.write:
        write_section(
            Path("docs/RESULTS.md"), "allocation_pricing", text, "benchmarks/allocation_pricing.py"
        )


if __name__ == "__main__":
    main()
