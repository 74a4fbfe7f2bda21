"""Nodes of the ``reporting`` pipeline: MLflow child runs, comparison table and plots.

Rows are named by namespace: ``dense``, one per solver and, after the ``refinement`` pipeline,
``refined.<solver>`` for each solver's model fine-tuned after compression. Every row's record is
``{"model_fingerprint", "metrics"}`` (evaluation); the metric names are the same in every row.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from weighted_lowrank.lineage import FINGERPRINT_KEY, fingerprint_of, with_fingerprint
from weighted_lowrank.lowrank.targets import describe_module
from weighted_lowrank.parameters import (
    CompressionParams,
    DataParams,
    ModelParams,
    RefinementParams,
    ReportingParams,
)

from .run_history import base_solver, is_refined, task_metric

#: Columns of the comparison table, in reading order (absent task metrics are dropped).
_TABLE_COLUMNS = [
    "namespace",
    "accuracy",
    "f1",
    "mcc",
    "pearson",
    "spearman",
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
DEFAULT_TARGETS = "default: attention Q/K/V/O + FFN"


def child_run_record(
    evaluation: dict[str, Any],
    compression: CompressionParams,
    model: ModelParams,
    data: DataParams,
    seed: int,
    *,
    namespace: str,
) -> dict[str, Any]:
    """Params + metrics of the MLflow child run of row ``namespace`` (``dense`` or a solver).

    The same param and metric names in every row; ``refinement`` is ``off`` (see
    :func:`refined_child_run_record`). Tags: ``kind`` (dense or solver) and the lineage
    fingerprint. (``namespace`` comes last, keyword-only: Kedro maps a node's inputs onto the
    leading parameters, whose annotations say which blocks it builds as typed objects.)
    """
    kind = "dense" if namespace == "dense" else "solver"
    return _child_run(evaluation, compression, model, data, seed, namespace, "off", kind)


def refined_child_run_record(
    evaluation: dict[str, Any],
    compression: CompressionParams,
    model: ModelParams,
    data: DataParams,
    seed: int,
    refinement: RefinementParams,
    *,
    namespace: str,
) -> dict[str, Any]:
    """:func:`child_run_record` of a ``refined.<solver>`` row: its ``refinement`` param says
    which parameters were trained for how many epochs (:meth:`RefinementParams.describe`)."""
    return _child_run(
        evaluation, compression, model, data, seed, namespace, refinement.describe(), "refined"
    )


def _child_run(
    evaluation: dict[str, Any],
    compression: CompressionParams,
    model: ModelParams,
    data: DataParams,
    seed: int,
    namespace: str,
    refinement: str,
    kind: str,
) -> dict[str, Any]:
    is_dense = namespace == "dense"
    targets = compression.targets
    params = {
        "solver": namespace,
        "budget": 1.0 if is_dense else compression.budget,
        "rank_rule": "dense" if is_dense else "floor(budget*out*in/(out+in)) per targeted layer",
        # A list of module names reads as it is written in the YAML.
        "targets": str(list(targets) if isinstance(targets, tuple) else targets or DEFAULT_TARGETS),
        "model": model.source,
        "task": data.glue.task if data.source == "glue" else data.source,
        "seed": seed,
        "refinement": refinement,
    }
    fingerprint = fingerprint_of(evaluation)
    return {
        "params": params,
        "metrics": dict(evaluation["metrics"]),
        "tags": {"kind": kind, **({FINGERPRINT_KEY: fingerprint} if fingerprint else {})},
    }


def row_order(namespaces: list[str]) -> list[str]:
    """``dense``, then the solvers, then the refined solvers (each group sorted)."""
    solvers = sorted(name for name in namespaces if name != "dense" and not is_refined(name))
    refined = sorted(name for name in namespaces if is_refined(name))
    return ["dense", *solvers, *refined]


def comparison_table(**evaluations: dict[str, Any]) -> pd.DataFrame:
    """One row per namespace (dense first), the evaluation metrics side by side.

    The table carries the fingerprint of the fine-tuned model its rows were made from.
    """
    if "dense" not in evaluations:
        raise ValueError(
            f"comparison needs the dense evaluation; got namespaces {sorted(evaluations)}"
        )
    order = row_order(list(evaluations))
    table = pd.DataFrame([{"namespace": name, **evaluations[name]["metrics"]} for name in order])
    columns = [column for column in _TABLE_COLUMNS if column in table.columns]
    table = table[columns + [column for column in table.columns if column not in columns]]
    return with_fingerprint(table, fingerprint_of(evaluations["dense"]))


def comparison_markdown(table: pd.DataFrame, compression: CompressionParams) -> str:
    """The comparison table as Markdown, saying what the ratios count."""
    header = (
        f"# Solver comparison at budget {compression.budget}\n\n"
        "`params_ratio_layers`: parameters kept in the targeted Linear layers / their dense count; "
        "`params_ratio_model`: whole-model parameters / dense whole model (both counted from the saved "
        "tensors). `weighted_loss_rel_svd`: Σ_layers weighted loss / SVD's, under the same Fisher. "
        "`latency_ratio`: median CPU forward latency / dense, measured in the same process.\n\n"
    )
    shown = table.drop(columns=[FINGERPRINT_KEY], errors="ignore")
    return header + markdown_table(shown) + "\n"


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

    Each ``refined.<solver>`` row is a hollow marker in its solver's colour, joined to the
    solver's point (the model before and after fine-tuning after compression).
    """
    metric = task_metric(table)
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    rows = table.set_index("namespace")
    axis.axhline(rows.loc["dense", metric], color="black", linestyle="--", label="dense")
    colours = {}
    for name, row in rows.iterrows():
        if name == "dense" or is_refined(name):
            continue
        points = axis.scatter(row["params_ratio_model"], row[metric], s=40)
        colours[name] = points.get_facecolor()[0]
        axis.annotate(
            name,
            (row["params_ratio_model"], row[metric]),
            xytext=(4, 4),
            textcoords="offset points",
        )
    refined = [name for name in rows.index if is_refined(name)]
    for name in refined:
        row, solver = rows.loc[name], base_solver(name)
        colour = colours.get(solver, "black")
        axis.scatter(
            row["params_ratio_model"], row[metric], s=40, facecolors="none", edgecolors=colour
        )
        if solver in colours:
            base = rows.loc[solver]
            axis.plot(
                [base["params_ratio_model"], row["params_ratio_model"]],
                [base[metric], row[metric]],
                color=colour,
                linewidth=0.8,
            )
    axis.set_xlabel("parameters kept (whole model, fraction of dense)")
    axis.set_ylabel(f"test {metric}")
    axis.set_title(
        "Task quality vs size (hollow: fine-tuned after compression)"
        if refined
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


def convergence_figure(reporting: ReportingParams, **tables: pd.DataFrame) -> Figure:
    """Loss vs seconds of every solver on the ``layers`` layers with the largest SVD gap.

    Keyword tables: ``<solver>_report`` (its layer report, for ``loss_rel_svd``) and
    ``<solver>_convergence`` (its loss histories: module, step, seconds, loss).
    """
    layers = reporting.convergence_layers
    reports = {k.removesuffix("_report"): v for k, v in tables.items() if k.endswith("_report")}
    histories = {
        k.removesuffix("_convergence"): v for k, v in tables.items() if k.endswith("_convergence")
    }
    reference = next(iter(reports.values()))
    gap = pd.concat(
        [report.set_index("module")["loss_rel_svd"] for report in reports.values()], axis=1
    ).min(axis=1)
    chosen = gap.sort_values().index[: max(1, min(layers, len(reference)))]
    figure = Figure(figsize=(4.5 * len(chosen), 4))
    axes = figure.subplots(1, len(chosen), squeeze=False)
    for axis, module in zip(axes[0], chosen, strict=True):
        for solver, table in sorted(histories.items()):
            history = table[table["module"] == module].sort_values("step")
            if len(history) > 1:
                axis.plot(history["seconds"], history["loss"], label=solver)
            else:
                axis.scatter(history["seconds"], history["loss"], label=solver, marker="x")
        axis.set_yscale("log")
        axis.set_xlabel("seconds")
        axis.set_title(_short_module_name(module), fontsize=9)
    axes[0][0].set_ylabel("weighted loss")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("Solver convergence (layers where the weighted solvers gain most over SVD)")
    figure.tight_layout()
    return figure


def _short_module_name(name: str) -> str:
    layer, kind = describe_module(name)
    return kind if layer is None else f"L{layer}.{kind}"
