"""Nodes of the ``reporting`` pipeline: MLflow child runs, comparison table and plots."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from weighted_lowrank.lowrank.targets import describe_module
from weighted_lowrank.run_history import task_metric

#: Columns of the comparison table, in reading order (absent task metrics are dropped).
_TABLE_COLUMNS = [
    "namespace",
    "accuracy",
    "accuracy_refined",
    "f1",
    "f1_refined",
    "mcc",
    "mcc_refined",
    "pearson",
    "pearson_refined",
    "spearman",
    "spearman_refined",
    "weighted_loss_rel_svd",
    "params_kept",
    "params_ratio_layers",
    "params_ratio_model",
    "size_on_disk_bytes",
    "latency_ms",
    "latency_ratio",
    "latency_dense_ms",
    "factorization_seconds",
]


def child_run_record(
    namespace: str,
    metrics: dict[str, float],
    compression: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    seed: int,
    refinement: dict[str, Any],
) -> dict[str, Any]:
    """Params + metrics of one MLflow child run; the same names for every solver and ``dense``.

    ``refinement`` says what the ``*_refined`` metrics measure: ``off``, or which parameters were
    trained for how many epochs (``dense`` is never refined; its ``*_refined`` are its own).
    """
    task = data["glue"]["task"] if data.get("source") == "glue" else data.get("source", "catalog")
    is_dense = namespace == "dense"
    params = {
        "solver": namespace,
        "budget": 1.0 if is_dense else compression["budget"],
        "rank_rule": "dense" if is_dense else "floor(budget*out*in/(out+in)) per targeted layer",
        "targets": str(compression.get("targets") or "default: attention Q/K/V/O + FFN"),
        "model": model["source"],
        "task": task,
        "seed": seed,
        "refinement": (
            f"{refinement.get('trainable', 'all')}, {refinement.get('epochs')} epoch(s)"
            if refinement.get("enabled")
            else "off"
        ),
    }
    return {
        "params": params,
        "metrics": dict(metrics),
        "tags": {"kind": "dense" if is_dense else "solver"},
    }


def comparison_table(**evaluations: dict[str, float]) -> pd.DataFrame:
    """One row per namespace (dense first), the evaluation metrics side by side."""
    if "dense" not in evaluations:
        raise ValueError(
            f"comparison needs the dense evaluation; got namespaces {sorted(evaluations)}"
        )
    rows = [{"namespace": name, **metrics} for name, metrics in evaluations.items()]
    table = pd.DataFrame(rows)
    order = ["dense"] + sorted(name for name in evaluations if name != "dense")
    table = table.set_index("namespace").loc[order].reset_index()
    columns = [column for column in _TABLE_COLUMNS if column in table.columns]
    return table[columns + [column for column in table.columns if column not in columns]]


def comparison_markdown(table: pd.DataFrame, compression: dict[str, Any]) -> str:
    """The comparison table as Markdown, saying what the ratios count."""
    header = (
        f"# Solver comparison at budget {compression['budget']}\n\n"
        "`params_ratio_layers`: parameters kept in the targeted Linear layers / their dense count; "
        "`params_ratio_model`: whole-model parameters / dense whole model (both counted from the saved "
        "tensors). `weighted_loss_rel_svd`: Σ_layers weighted loss / SVD's, under the same Fisher. "
        "`latency_ratio`: median CPU forward latency / dense, measured in the same process.\n\n"
    )
    return header + markdown_table(table) + "\n"


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += [
        "| " + " | ".join(cell(value) for value in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join(lines)


def accuracy_vs_params_figure(table: pd.DataFrame) -> Figure:
    """Task metric against whole-model parameters kept, one point per solver, dense as a line.

    When the table has ``<metric>_refined`` (refinement enabled), each solver also gets a hollow
    marker for its model fine-tuned after compression, joined to the unrefined one.
    """
    metric = task_metric(table)
    refined = f"{metric}_refined"
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    dense = table[table["namespace"] == "dense"].iloc[0]
    axis.axhline(dense[metric], color="black", linestyle="--", label="dense")
    for _, row in table[table["namespace"] != "dense"].iterrows():
        points = axis.scatter(row["params_ratio_model"], row[metric], s=40)
        if refined in table:
            colour = points.get_facecolor()[0]
            axis.scatter(
                row["params_ratio_model"], row[refined], s=40, facecolors="none", edgecolors=colour
            )
            axis.plot(
                [row["params_ratio_model"]] * 2,
                [row[metric], row[refined]],
                color=colour,
                linewidth=0.8,
            )
        axis.annotate(
            row["namespace"],
            (row["params_ratio_model"], row[metric]),
            xytext=(4, 4),
            textcoords="offset points",
        )
    axis.set_xlabel("parameters kept (whole model, fraction of dense)")
    axis.set_ylabel(f"test {metric}")
    axis.set_title(
        "Task quality vs size (hollow: fine-tuned after compression)"
        if refined in table
        else "Task quality vs size, no re-fine-tuning"
    )
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def layer_loss_figure(**layer_reports: pd.DataFrame) -> Figure:
    """Per-layer weighted loss relative to SVD's, one line per solver (log scale)."""
    figure = Figure(figsize=(10, 4.5))
    axis = figure.subplots()
    for solver, report in sorted(layer_reports.items()):
        axis.plot(range(len(report)), report["loss_rel_svd"], marker=".", label=solver)
    first = next(iter(layer_reports.values()))
    labels = [_short_module_name(name) for name in first["module"]]
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axis.set_yscale("log")
    axis.set_ylabel("weighted loss / SVD's")
    axis.set_title("Per-layer weighted loss relative to SVD")
    axis.legend(ncol=4, fontsize=8)
    figure.tight_layout()
    return figure


def convergence_figure(reporting: dict[str, Any], **layer_reports: pd.DataFrame) -> Figure:
    """Loss vs seconds of every solver on the ``layers`` layers with the largest SVD gap."""
    layers = int(reporting["convergence_layers"])
    reference = next(iter(layer_reports.values()))
    gap = pd.concat(
        [report.set_index("module")["loss_rel_svd"] for report in layer_reports.values()], axis=1
    ).min(axis=1)
    chosen = gap.sort_values().index[: max(1, min(layers, len(reference)))]
    figure = Figure(figsize=(4.5 * len(chosen), 4))
    axes = figure.subplots(1, len(chosen), squeeze=False)
    for axis, module in zip(axes[0], chosen, strict=True):
        for solver, report in sorted(layer_reports.items()):
            row = report.set_index("module").loc[module]
            history = _history(row["history"])
            if len(history) > 1:
                seconds, losses = zip(*history, strict=True)
                axis.plot(seconds, losses, label=solver)
            else:
                axis.scatter([history[0][0]], [history[0][1]], label=solver, marker="x")
        axis.set_yscale("log")
        axis.set_xlabel("seconds")
        axis.set_title(_short_module_name(module), fontsize=9)
    axes[0][0].set_ylabel("weighted loss")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("Solver convergence (layers where the weighted solvers gain most over SVD)")
    figure.tight_layout()
    return figure


def _history(value: Any) -> list[tuple[float, float]]:
    points = json.loads(value) if isinstance(value, str) else value
    return [(float(seconds), float(loss)) for seconds, loss in points]


def _short_module_name(name: str) -> str:
    layer, kind = describe_module(name)
    return kind if layer is None else f"L{layer}.{kind}"
