"""Nodes of the ``reporting`` pipeline: MLflow child runs, paired tests, comparison table, plots.

Rows are named by namespace: ``dense``, one per solver and ``refined.<solver>``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import special

from weighted_lowrank.analysis.paired import (
    CONFIDENCE,
    STATISTICS,
    paired_comparison,
    paired_loss_comparison,
)
from weighted_lowrank.analysis.paired import (
    REFERENCES as PAIRED_REFERENCES,
)
from weighted_lowrank.analysis.run_history import (
    PREDICTIONS_ARTIFACT,
    base_solver,
    is_refined,
    markdown_table,
    task_metric,
    test_set_differences,
)
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY, fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import (
    CompressionParams,
    DataParams,
    ModelParams,
    RefinementParams,
    ReportingParams,
)
from weighted_lowrank.lowrank.targets import (
    DEFAULT_TARGETS_DESCRIPTION,
    describe_module,
    ordered_kinds,
)
from weighted_lowrank.pipelines.evaluation.nodes import LOGIT_PREFIX

#: Columns of the comparison table, in reading order (absent task metrics are dropped).
_TABLE_COLUMNS = (
    "namespace accuracy f1 mcc pearson spearman perplexity token_accuracy test_loss "
    "test_loss_increase kl_to_dense predicted_loss_increase weighted_loss_rel_svd params_kept "
    "params_ratio_layers params_ratio_model size_on_disk_bytes latency_ms latency_ratio "
    "latency_dense_ms factorization_seconds"
).split()
#: Columns ``vs_<reference>_<statistic>``, parent-run metrics ``paired.<row>.vs_<ref>.<stat>``.
PAIRED_STATISTICS = STATISTICS
_COUNTS = ("disagreements", "wins", "losses")
RANK_MAP_ARTIFACT = "rank_map.parquet"
#: A solver row's ``rank_rule`` param, per ``compression.allocation``.
RANK_RULES = {
    "uniform": "floor(budget*out*in/(out+in)) per targeted layer",
    "global": "global: min summed predicted loss, params <= uniform's",
}


def dense_child_run_record(
    evaluation: dict[str, Any],
    predictions: pd.DataFrame,
    compression: CompressionParams,
    model: ModelParams,
    data: DataParams,
    seed: int,
    *,
    namespace: str = "dense",
) -> dict[str, Any]:
    """The ``dense`` child run: no layer groups nor rank map, allocation ``dense``. (Keyword-only
    ``namespace``: Kedro maps a node's inputs onto the leading, annotated parameters.)"""
    return _child_run(evaluation, predictions, None, compression, model, data, seed, namespace)


def child_run_record(
    evaluation: dict[str, Any],
    predictions: pd.DataFrame,
    layer_report: pd.DataFrame,
    rank_map: pd.DataFrame,
    compression: CompressionParams,
    model: ModelParams,
    data: DataParams,
    seed: int,
    *,
    namespace: str,
) -> dict[str, Any]:
    """Params, metrics, tags and artifacts of solver row ``namespace``'s child run, with the same
    names in every solver row (metrics and tags per layer group: :func:`layer_group_summary`)."""
    reports = (layer_report, rank_map)
    return _child_run(evaluation, predictions, reports, compression, model, data, seed, namespace)


def refined_child_run_record(
    evaluation: dict[str, Any],
    predictions: pd.DataFrame,
    layer_report: pd.DataFrame,
    rank_map: pd.DataFrame,
    compression: CompressionParams,
    model: ModelParams,
    data: DataParams,
    seed: int,
    refinement: RefinementParams,
    *,
    namespace: str,
) -> dict[str, Any]:
    """:func:`child_run_record` of a ``refined.<solver>`` row, whose ``refinement`` param says
    what was trained."""
    reports = (layer_report, rank_map)
    return _child_run(
        evaluation, predictions, reports, compression, model, data, seed, namespace, refinement
    )


def layer_group_summary(layer_report: pd.DataFrame) -> tuple[dict[str, float], dict[str, str]]:
    """Per layer group (shape ``<out>x<in>``): ``iterations.<group>``, the most any layer ran,
    and ``stop_reason.<group>``, e.g. ``converged:5,max_iters:1`` (most frequent first)."""
    # Shape alone, not rank: a global allocation's ranks would give each solver's child run
    # other names where MLflow's compare view needs the same ones.
    groups = layer_report["shape"].astype(str)
    metrics, tags = {}, {}
    for group, rows in layer_report.groupby(groups, sort=True):
        metrics[f"iterations.{group}"] = float(rows["iterations"].max())
        counts = Counter(rows["stop_reason"].astype(str))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        summary = ",".join(f"{reason}:{count}" for reason, count in ranked)
        tags[f"stop_reason.{group}"] = ranked[0][0] if len(ranked) == 1 else summary
    return metrics, tags


def _child_run(
    evaluation: dict[str, Any],
    predictions: pd.DataFrame,
    reports: tuple[pd.DataFrame, pd.DataFrame] | None,
    compression: CompressionParams,
    model: ModelParams,
    data: DataParams,
    seed: int,
    namespace: str,
    refinement: RefinementParams | None = None,
) -> dict[str, Any]:
    is_dense = reports is None
    layer_report, rank_map = reports or (None, None)
    kind = "dense" if is_dense else "solver" if refinement is None else "refined"
    targets = compression.targets
    params = {
        "solver": namespace,
        "budget": 1.0 if is_dense else compression.budget,
        "allocation": "dense" if is_dense else compression.allocation,
        "curve_loss_model": "dense" if is_dense else compression.curve_loss_model,
        "rank_rule": "dense" if is_dense else RANK_RULES[compression.allocation],
        # A list of module names reads as it is written in the YAML.
        "targets": str(
            list(targets) if isinstance(targets, tuple) else targets or DEFAULT_TARGETS_DESCRIPTION
        ),
        "model": model.source,
        "task": data.glue.task if data.source == "glue" else data.source,
        "seed": seed,
        "refinement": "off" if refinement is None else refinement.describe(),
    }
    groups, reasons = ({}, {}) if is_dense else layer_group_summary(layer_report)
    fingerprint = fingerprint_of(evaluation)
    return {
        "params": params,
        "metrics": {**evaluation["metrics"], **groups},
        "tags": {
            "kind": kind,
            **({FINGERPRINT_KEY: fingerprint} if fingerprint else {}),
            **reasons,
        },
        "artifacts": {
            PREDICTIONS_ARTIFACT: predictions,
            **({} if is_dense else {RANK_MAP_ARTIFACT: rank_map}),
        },
    }


def row_order(namespaces: list[str]) -> list[str]:
    """``dense``, then the solvers, then the refined solvers (each group sorted)."""
    solvers = sorted(name for name in namespaces if name != "dense" and not is_refined(name))
    refined = sorted(name for name in namespaces if is_refined(name))
    return ["dense", *solvers, *refined]


def paired_tests(reporting: ReportingParams, **predictions: pd.DataFrame) -> pd.DataFrame:
    """Per row (the comparison table's order), ``kl_to_dense`` and the paired tests
    (:mod:`weighted_lowrank.analysis.paired`) against each of :data:`PAIRED_REFERENCES` on the
    shared test set: ``vs_<reference>_<statistic>``, missing in the reference's own row; a
    regression gets ``kl_to_dense`` alone."""
    order = [name for name in row_order(list(predictions)) if name in predictions]
    tables = {name: predictions[name].sort_values("id", ignore_index=True) for name in order}
    _check_same_examples(tables)
    table = pd.DataFrame({"namespace": order, "kl_to_dense": kl_to_dense(tables)})
    fingerprint = fingerprint_of(predictions[order[0]])
    language_model = all("prediction" not in t.columns for t in tables.values())
    if language_model:
        compare = lambda row, ref: paired_loss_comparison(  # noqa: E731
            tables[row]["loss"].to_numpy(),
            tables[ref]["loss"].to_numpy(),
            tables[ref]["tokens"].to_numpy(),
            reporting.bootstrap_resamples,
            reporting.bootstrap_seed,
        )
    elif all(pd.api.types.is_integer_dtype(t["prediction"]) for t in tables.values()):
        correct = {name: (t["prediction"] == t["label"]).to_numpy() for name, t in tables.items()}
        compare = lambda row, ref: paired_comparison(  # noqa: E731
            correct[row], correct[ref], reporting.bootstrap_resamples, reporting.bootstrap_seed
        )
    else:
        return with_fingerprint(table, fingerprint)
    for reference in PAIRED_REFERENCES:
        if reference not in tables:
            continue
        results = [
            compare(name, reference).statistics()
            if name != reference
            else dict.fromkeys(PAIRED_STATISTICS, math.nan)
            for name in order
        ]
        for stat in PAIRED_STATISTICS:
            column = pd.Series([result[stat] for result in results], dtype="float64")
            # Counts stay integers; the reference's own row is missing (<NA>) there.
            table[f"vs_{reference}_{stat}"] = column.astype("Int64") if stat in _COUNTS else column
    return with_fingerprint(table, fingerprint)


def kl_to_dense(tables: dict[str, pd.DataFrame]) -> list[float]:
    """Per table (sorted by ``id``, one test set), the mean KL(p_dense ‖ p_row) in nats over the
    examples, p the float64 softmax of the logits — what a Fisher-weighted loss model predicts to
    second order; NaN without ``dense`` or logits."""
    dense = _log_probabilities(tables["dense"]) if "dense" in tables else None
    values = []
    for table in tables.values():
        row = _log_probabilities(table)
        if dense is None or row is None or row.shape != dense.shape:
            values.append(math.nan)
            continue
        values.append(float(np.mean(np.sum(np.exp(dense) * (dense - row), axis=1))))
    return values


def _log_probabilities(predictions: pd.DataFrame) -> np.ndarray | None:
    """Log-softmax of a predictions table's logit columns, classes in order; None without any."""
    columns = [column for column in predictions.columns if column.startswith(LOGIT_PREFIX)]
    if not columns:
        return None
    columns.sort(key=lambda column: int(column.removeprefix(LOGIT_PREFIX)))
    return special.log_softmax(predictions[columns].to_numpy(np.float64), axis=1)


def _check_same_examples(tables: dict[str, pd.DataFrame]) -> None:
    """Raise unless every table has the first's ids and labels (a language model's: tokens)."""
    differing = test_set_differences(tables)
    if differing:
        first = next(iter(tables))
        details = "; ".join(f"{name}: {why}" for name, why in differing.items())
        raise ValueError(
            f"paired tests need every row's predictions on one test set; against "
            f"{first!r} ({len(tables[first])} examples): {details}. Re-run the evaluation of these "
            "rows on the current test_split (or pin matching versions with --load-versions)"
        )


def paired_metrics(paired: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The paired tests as parent-run metrics ``<row>.vs_<reference>.<statistic>`` (step 0)."""
    return {
        f"{row['namespace']}.vs_{reference}.{stat}": {"value": float(value), "step": 0}
        for row in paired.to_dict("records")
        for reference in PAIRED_REFERENCES
        for stat in PAIRED_STATISTICS
        if (value := row.get(f"vs_{reference}_{stat}")) is not None and not pd.isna(value)
    }


def comparison_table(paired: pd.DataFrame, **evaluations: dict[str, Any]) -> pd.DataFrame:
    """One row per namespace (dense first): the evaluation metrics, ``test_loss_increase``
    (minus dense's), then the paired tests' columns; stamped with dense's fingerprint."""
    if "dense" not in evaluations:
        raise ValueError(
            f"comparison needs the dense evaluation; got namespaces {sorted(evaluations)}"
        )
    order = row_order(list(evaluations))
    table = pd.DataFrame([{"namespace": name, **evaluations[name]["metrics"]} for name in order])
    dense_loss = table.loc[table["namespace"] == "dense", "test_loss"].iloc[0]
    table["test_loss_increase"] = table["test_loss"] - dense_loss
    # Evaluations recorded before the loss models' prediction was measured have none.
    if "predicted_loss_increase" not in table:
        table["predicted_loss_increase"] = math.nan
    table = table.merge(
        paired.drop(columns=[FINGERPRINT_KEY], errors="ignore"), on="namespace", how="left"
    )
    tests = [column for column in table.columns if column.startswith("vs_")]
    columns = [column for column in _TABLE_COLUMNS if column in table.columns]
    rest = [column for column in table.columns if column not in columns and column not in tests]
    return with_fingerprint(table[columns + rest + tests], fingerprint_of(evaluations["dense"]))


def comparison_markdown(
    table: pd.DataFrame, compression: CompressionParams, reporting: ReportingParams
) -> str:
    """The comparison table as Markdown, saying what the ratios count, then the paired tests."""
    header = (
        f"# Solver comparison at budget {compression.budget}, {compression.allocation} "
        "allocation\n\n"
        "`kl_to_dense`: mean over the test examples of KL(p_dense ‖ p_row), nats — the measured "
        "damage the loss models predict; `predicted_loss_increase`: their prediction, Σ over the "
        "solver's rank map of the predicted loss at each layer's rank. `test_loss_increase`: test "
        "cross-entropy − dense's, the same damage seen through the labels, so noisier. "
        "`params_ratio_layers`: parameters kept in the targeted Linear layers / their dense count; "
        "`params_ratio_model`: whole-model parameters / dense whole model (both counted from the saved "
        "tensors). `weighted_loss_rel_svd`: Σ_layers weighted loss / SVD's, under the same Fisher. "
        "`latency_ratio`: median CPU forward latency / dense, measured in the same process.\n\n"
    )
    paired = [column for column in table.columns if column.startswith("vs_")]
    shown = table.drop(columns=[FINGERPRINT_KEY, *paired], errors="ignore")
    return header + markdown_table(shown) + "\n\n" + paired_markdown(table, reporting) + "\n"


def paired_markdown(table: pd.DataFrame, reporting: ReportingParams) -> str:
    """The "Paired tests" section: per row and reference, wins / losses, the exact p and the
    difference with its bootstrap interval (or why there are none)."""
    title = "## Paired tests\n\n"
    language_model = "perplexity" in table
    if "accuracy" not in table and not language_model:
        return title + (
            "Not computed: this is a regression task. The McNemar test and the accuracy "
            "bootstrap need a right/wrong outcome per example, which a predicted value does not "
            "have. Each row's per-example predictions are saved (`<row>.predictions`) for a "
            "test of your choice."
        )
    references = [ref for ref in PAIRED_REFERENCES if f"vs_{ref}_p" in table]
    if not references:
        return title + (
            f"Not computed: neither reference ({', '.join(PAIRED_REFERENCES)}) is a row of this "
            "comparison."
        )
    level = f"{CONFIDENCE:.0%}"
    difference, digits, note = _paired_note(language_model, references, level)
    resampling = (
        f"{reporting.bootstrap_resamples:,} paired bootstrap resamples of the "
        f"{'blocks' if language_model else 'examples'} (seed {reporting.bootstrap_seed}).\n\n"
    )
    header = ["row"]
    for ref in references:
        header += [f"vs {ref}: wins / losses", "p", f"{difference} [{level} CI]"]
    rows = []
    for row in table.to_dict("records"):
        cells = [str(row["namespace"])]
        for ref in references:
            p = row[f"vs_{ref}_p"]
            if pd.isna(p):
                cells += ["–", "–", "–"]
                continue
            cells += [
                f"{int(row[f'vs_{ref}_wins'])} / {int(row[f'vs_{ref}_losses'])}",
                "< 0.001" if p < 0.001 else f"{p:.3f}",
                f"{row[f'vs_{ref}_diff']:+.{digits}f} [{row[f'vs_{ref}_ci_low']:+.{digits}f}, "
                f"{row[f'vs_{ref}_ci_high']:+.{digits}f}]",
            ]
        rows.append(cells)
    return title + note + resampling + markdown_table(pd.DataFrame(rows, columns=header))


def _paired_note(language_model: bool, references: list[str], level: str) -> tuple[str, int, str]:
    """The difference's name, its digits and the note explaining the paired tests' columns."""
    against = " and ".join(f"`{ref}`" for ref in references)
    if language_model:
        difference, digits = "Δ test loss", 4
        note = (
            f"Every row against {against} on the same test token blocks. *wins / losses*: blocks "
            "where this row's mean next-token loss is lower / higher than the reference's. *p*: "
            "exact two-sided sign test of the wins among the blocks that differ. "
            f"*{difference} [{level} CI]*: this row's test loss (nats per token) minus the "
            "reference's — exp of it is the perplexity ratio — with the percentile interval of "
        )
    else:
        difference, digits = "Δ accuracy", 3
        note = (
            f"Every row against {against} on the same test examples. *wins / losses*: examples "
            "only this row / only the reference gets right (the discordant pairs; the rest are "
            "ties). *p*: exact two-sided McNemar test (binomial test of the wins among the "
            f"discordant pairs). *{difference} [{level} CI]*: this row's accuracy minus the "
            "reference's, with the percentile interval of "
        )
    return difference, digits, note


def accuracy_vs_params_figure(table: pd.DataFrame) -> Figure:
    """Task metric against whole-model parameters kept, one point per solver, dense as a line,
    each refined row a hollow marker joined to its solver's point."""
    metric = task_metric(table)
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    points = table.set_index("namespace")[["params_ratio_model", metric]]
    axis.axhline(points.loc["dense", metric], color="black", linestyle="--", label="dense")
    colours = {}
    for name, point in points.iterrows():
        if name != "dense" and not is_refined(name):
            colours[name] = axis.scatter(*point, s=40).get_facecolor()[0]
            axis.annotate(name, tuple(point), xytext=(4, 4), textcoords="offset points")
    refined = [name for name in points.index if is_refined(name)]
    for name in refined:
        solver = base_solver(name)
        colour = colours.get(solver, "black")
        axis.scatter(*points.loc[name], s=40, facecolors="none", edgecolors=colour)
        if solver in colours:
            axis.plot(*points.loc[[solver, name]].to_numpy().T, color=colour, linewidth=0.8)
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


def rank_allocation_figure(compression: CompressionParams, **rank_maps: pd.DataFrame) -> Figure:
    """Per solver (keyword: its rank map) a panel of each layer's kept rank / min(out, in)
    against its encoder layer, one line per kind; a layer kept dense is a black square at 1.
    (A panel per solver: its whole allocation reads at a glance.)"""
    columns = 4
    rows = math.ceil(len(rank_maps) / columns)
    figure = Figure(figsize=(3.3 * columns + 1.5, 2.5 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True).ravel()
    kinds = ordered_kinds(kind for table in rank_maps.values() for kind in table["kind"])
    colours = {kind: f"C{index}" for index, kind in enumerate(kinds)}
    for axis, (solver, table) in zip(axes, sorted(rank_maps.items()), strict=False):
        # Targets outside the encoder layers (no layer index) are placed in model order.
        position = (
            table["layer"].astype("float64")
            if table["layer"].notna().all()
            else pd.Series(range(len(table)), index=table.index, dtype="float64")
        )
        for kind, rows_of_kind in table.groupby("kind", sort=False):
            axis.plot(
                position[rows_of_kind.index],
                rows_of_kind["rank_fraction"],
                marker=".",
                linewidth=1,
                color=colours[kind],
            )
        dense = table["dense"].astype(bool)
        axis.scatter(position[dense], table.loc[dense, "rank_fraction"], marker="s", color="black")
        kept = table["params_kept"].sum() / table["params_dense"].sum()
        axis.set_title(f"{solver} (params kept {kept:.2f})", fontsize=9)
        axis.set_ylim(0, 1.05)
    for index in range(len(rank_maps), len(axes)):
        axes[index].remove()
        if index >= columns:
            # The panel above an empty slot is the last of its column: it shows the layer ticks.
            axes[index - columns].xaxis.set_tick_params(labelbottom=True)
    for axis in axes[::columns]:
        axis.set_ylabel("rank / min(out, in)", fontsize=8)
    handles = [Line2D([], [], color=colours[kind], marker=".", label=kind) for kind in kinds]
    handles.append(Line2D([], [], color="black", marker="s", linestyle="", label="kept dense"))
    figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure.supxlabel("encoder layer", fontsize=9)
    figure.suptitle(
        f"Kept rank per layer: {compression.allocation} allocation at budget {compression.budget}"
    )
    return figure


def convergence_figure(reporting: ReportingParams, **tables: pd.DataFrame) -> Figure:
    """Loss vs seconds of every solver (keywords ``<solver>_report``, ``<solver>_convergence``)
    on the ``reporting.convergence_layers`` layers with the largest gain over SVD."""
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
