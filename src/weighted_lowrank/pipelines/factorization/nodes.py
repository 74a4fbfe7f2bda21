"""Nodes of the ``factorization`` pipeline."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import pandas as pd
import torch
from torch import nn

from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import CompressionParams
from weighted_lowrank.lowrank.allocation import (
    LossCurve,
    allocate_ranks,
    check_curves,
    parameter_budget,
    uniform_ranks,
)
from weighted_lowrank.lowrank.compression import (
    apply_factors,
    factorize_model,
    layer_seconds,
    model_loss_curves,
    svd_reference_losses,
)
from weighted_lowrank.lowrank.objective import FactorizationResult, relative_loss
from weighted_lowrank.lowrank.parallel import parse_parallel
from weighted_lowrank.lowrank.solvers import solver_spec
from weighted_lowrank.lowrank.targets import describe_module, select_linear_modules
from weighted_lowrank.pipelines.fisher_estimation.nodes import recorded_num_examples

#: Columns of ``convergence``: one row per point of a layer's loss history.
CONVERGENCE_COLUMNS = ("module", "step", "seconds", "loss")
#: Columns of ``loss_curves``: one row per targeted layer and rank that saves parameters.
CURVE_COLUMNS = (
    "module",
    "out_features",
    "in_features",
    "rank",
    "params",
    "predicted_loss",
    "curve",
    "loss_model",
    "seconds",
)


def svd_reference(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    compression: CompressionParams,
) -> pd.DataFrame:
    """Plain truncated SVD's Fisher-weighted loss per targeted layer (module, rank, svd_loss) at
    the budget's uniform ranks: what every solver's ``loss_rel_svd`` is relative to."""
    model = fine_tuned_model.model
    losses = svd_reference_losses(
        model,
        fisher_information["tensors"],
        compression.budget,
        compression.targets,
        device=compression.device,
        **vars(parse_parallel(compression.parallel)),
    )
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in losses}
    ranks = uniform_ranks(shapes, compression.budget)
    table = pd.DataFrame(
        {
            "module": list(losses),
            "rank": [ranks[name] for name in losses],
            "svd_loss": list(losses.values()),
        }
    )
    return with_fingerprint(table, fine_tuned_model.model_fingerprint)


def loss_curves(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    calibration_statistics: dict[str, Any],
    compression: CompressionParams,
    options: dict[str, Any],
    *,
    solver: str,
) -> pd.DataFrame:
    """Every targeted layer's predicted loss increase at every rank that saves parameters, priced
    by ``compression.curve_loss_model``
    (:func:`~weighted_lowrank.lowrank.compression.model_loss_curves`). Columns
    :data:`CURVE_COLUMNS`; ``seconds`` is the wall time of all curves, on every row."""
    started = time.perf_counter()
    curves = model_loss_curves(
        fine_tuned_model.model,
        fisher_information["tensors"],
        solver,
        compression.targets,
        num_examples=recorded_num_examples(fisher_information.get("metadata") or {}) or 1,
        loss_model=compression.curve_loss_model,
        statistics=calibration_statistics["tensors"],
        device=compression.device,
        **vars(parse_parallel(compression.parallel)),
        **{"seed": compression.seed, **options},
    )
    seconds = time.perf_counter() - started
    rows = [
        (name, curve.out_features, curve.in_features, rank, curve.parameters(rank), float(loss))
        for name, curve in curves.items()
        for rank, loss in enumerate(curve.losses, start=1)
    ]
    table = pd.DataFrame(rows, columns=list(CURVE_COLUMNS[:6])).astype(
        {"rank": "int64", "params": "int64"}
    )
    table = table.assign(
        curve=solver_spec(solver).curve, loss_model=compression.curve_loss_model, seconds=seconds
    )
    return with_fingerprint(table, fine_tuned_model.model_fingerprint)


def allocate(
    loss_curves: pd.DataFrame,
    svd_reference_loss: pd.DataFrame,
    compression: CompressionParams,
    *,
    solver: str,
) -> pd.DataFrame:
    """The rank map (:func:`rank_map_table`): each layer's rank, or dense, under
    ``compression.allocation``: ``uniform`` the budget's ranks, ``global`` the ranks minimising
    the summed predicted loss within the parameters the uniform ranks keep
    (:func:`~weighted_lowrank.lowrank.allocation.allocate_ranks`). ``svd_reference_loss`` is read
    only to put this node downstream of ``svd_reference`` (made at the run's budget: the lineage
    check), so ``--from-nodes svd_reference`` remakes the rank maps and reuses the curves."""
    curves = curves_from_table(loss_curves)
    priced_by = sorted(set(loss_curves["loss_model"]))
    if priced_by != [compression.curve_loss_model]:
        raise ValueError(
            f"loss_curves were priced by {priced_by}, not compression.curve_loss_model="
            f"{compression.curve_loss_model!r}; rerun the {solver}.loss_curves node (e.g. add it "
            "to --from-nodes)"
        )
    shapes = {name: (curve.out_features, curve.in_features) for name, curve in curves.items()}
    max_parameters = parameter_budget(shapes, compression.budget)  # checks the uniform ranks
    if compression.allocation == "global":
        ranks = allocate_ranks(curves, max_parameters).ranks
    else:
        ranks = uniform_ranks(shapes, compression.budget)
    curve = str(loss_curves["curve"].iloc[0])
    if compression.curve_loss_model != "own":
        curve = f"{curve} priced by {compression.curve_loss_model}"
    table = rank_map_table(
        curves,
        ranks,
        allocation=compression.allocation,
        budget=compression.budget,
        max_parameters=max_parameters,
        solver=solver,
        curve=curve,
    )
    return with_fingerprint(table, fingerprint_of(loss_curves))


def curves_from_table(loss_curves: pd.DataFrame) -> dict[str, LossCurve]:
    """``{module: LossCurve}`` in the table's (model) order, each checked (finite, ≥ 0)."""
    curves = {
        name: LossCurve(
            int(rows["out_features"].iloc[0]),
            int(rows["in_features"].iloc[0]),
            rows.sort_values("rank")["predicted_loss"].to_numpy(dtype=float),
        )
        for name, rows in loss_curves.groupby("module", sort=False)
    }
    check_curves(curves)
    return curves


def rank_map_table(
    curves: Mapping[str, LossCurve],
    ranks: Mapping[str, int | None],
    *,
    allocation: str,
    budget: float,
    max_parameters: int,
    solver: str,
    curve: str,
) -> pd.DataFrame:
    """One row per layer (rank min(out, in) and predicted_loss 0 when dense)."""
    rows = []
    for name, layer_curve in curves.items():
        rank = ranks[name]
        layer, kind = describe_module(name)
        full_rank = min(layer_curve.out_features, layer_curve.in_features)
        params_dense = layer_curve.out_features * layer_curve.in_features
        params_kept = layer_curve.parameters(rank)
        rows.append(
            {
                "module": name,
                "layer": layer,
                "kind": kind,
                "out_features": layer_curve.out_features,
                "in_features": layer_curve.in_features,
                "rank": full_rank if rank is None else rank,
                "dense": rank is None,
                "params_dense": params_dense,
                "params_kept": params_kept,
                "kept_fraction": params_kept / params_dense,
                "rank_fraction": (full_rank if rank is None else rank) / full_rank,
                "predicted_loss": 0.0 if rank is None else float(layer_curve.losses[rank - 1]),
                "allocation": allocation,
                "budget": float(budget),
                "max_parameters": int(max_parameters),
                "solver": solver,
                "curve": curve,
            }
        )
    return pd.DataFrame(rows).astype({"layer": "Int64"})


def rank_map_ranks(rank_map: pd.DataFrame) -> dict[str, int | None]:
    """``{module: rank or None (dense)}`` of a rank map."""
    return {
        str(row.module): None if bool(row.dense) else int(row.rank) for row in rank_map.itertuples()
    }


def compress(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    calibration_statistics: dict[str, Any],
    svd_reference_loss: pd.DataFrame,
    rank_map: pd.DataFrame,
    compression: CompressionParams,
    options: dict[str, Any],
    *,
    solver: str,
) -> tuple[ModelBundle, pd.DataFrame, pd.DataFrame]:
    """Factorize the targeted layers with ``solver`` at the rank map's ranks (dense ones stay
    ``nn.Linear``); ``compression.seed`` is the solver's seed unless its ``options`` set one.
    Returns the compressed bundle, :func:`layer_report` and :func:`convergence_table`."""
    model = fine_tuned_model.model
    ranks = rank_map_ranks(rank_map)
    torch.manual_seed(compression.seed)
    started = time.perf_counter()
    results = factorize_model(
        model,
        fisher_information["tensors"],
        None,
        solver,
        compression.targets,
        statistics=calibration_statistics["tensors"],
        device=compression.device,
        ranks=ranks,
        **vars(parse_parallel(compression.parallel)),
        **{"seed": compression.seed, **options},
    )
    total_seconds = time.perf_counter() - started
    compressed = dataclasses.replace(fine_tuned_model, model=apply_factors(model, results))
    svd_losses = _reference_losses(
        svd_reference_loss, results, fine_tuned_model, fisher_information, compression
    )
    report = layer_report(
        model, results, svd_losses, budget=compression.budget, total_seconds=total_seconds
    )
    num_examples = recorded_num_examples(fisher_information.get("metadata") or {}) or 1
    predicted = rank_map.set_index("module")["predicted_loss"]
    after_solver = report.columns.get_loc("solver") + 1
    report.insert(
        after_solver, "predicted_loss", [float(predicted[name]) for name in report["module"]]
    )
    # The diagonal Fisher's quadratic in nats per example: what the element-wise solvers
    # minimise, beside the curve that chose their ranks (a proxy for them).
    report.insert(after_solver + 1, "diagonal_loss", 0.5 * report["weighted_loss"] / num_examples)
    fingerprint = fine_tuned_model.model_fingerprint
    return (
        compressed,
        with_fingerprint(report, fingerprint),
        with_fingerprint(convergence_table(results), fingerprint),
    )


def layer_report(
    model: nn.Module,
    results: Mapping[str, FactorizationResult],
    svd_losses: Sequence[float],
    *,
    budget: float,
    total_seconds: float,
) -> pd.DataFrame:
    """One row per factorized layer of ``model`` (the dense one), in ``results`` order:
    ``svd_loss`` is plain SVD's at the same rank, ``seconds`` the layer's share of its batch's
    wall time, then one ``info_<key>`` column per solver-info key (NaN where a layer has None)."""
    seconds = layer_seconds(results)
    rows = []
    for (name, result), svd_loss in zip(results.items(), svd_losses, strict=True):
        dense = model.get_submodule(name)
        out_features, in_features = dense.out_features, dense.in_features
        bias_params = 0 if dense.bias is None else out_features
        rows.append(
            {
                "module": name,
                "budget": float(budget),
                "shape": f"{out_features}x{in_features}",
                "out_features": out_features,
                "in_features": in_features,
                "rank": result.rank,
                "params_before": out_features * in_features + bias_params,
                "params_after": result.rank * (out_features + in_features) + bias_params,
                "weighted_loss": float(result.loss),
                "svd_loss": float(svd_loss),
                "loss_rel_svd": relative_loss(float(result.loss), float(svd_loss)),
                "initial_loss": float(result.initial_loss),
                "seconds": seconds[name],
                "total_seconds": total_seconds,
                "iterations": int(result.iterations),
                "stop_reason": result.stop_reason,
                "solver": result.solver,
            }
        )
    table = pd.DataFrame(rows)
    info_keys = dict.fromkeys(key for result in results.values() for key in result.info)
    for key in info_keys:
        table[f"info_{key}"] = _info_column([result.info.get(key) for result in results.values()])
    return table


def convergence_table(results: Mapping[str, FactorizationResult]) -> pd.DataFrame:
    """The loss histories as a long table: module, step (0 = the starting point), seconds (since
    the layer's batch started), loss — one row per history point."""
    rows = [
        (name, step, float(seconds), float(loss))
        for name, result in results.items()
        for step, (seconds, loss) in enumerate(result.history)
    ]
    return pd.DataFrame(rows, columns=list(CONVERGENCE_COLUMNS)).astype({"step": "int64"})


def _reference_losses(
    svd_reference_loss: pd.DataFrame,
    results: Mapping[str, FactorizationResult],
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    compression: CompressionParams,
) -> list[float]:
    """SVD's loss per factorized layer: the shared reference's at the same rank, computed here
    for the layers an allocation gave another rank."""
    reference = svd_reference_loss.set_index("module")
    differing = {
        name: result.rank
        for name, result in results.items()
        if name not in reference.index or int(reference.at[name, "rank"]) != result.rank
    }
    computed = {}
    if differing:
        model = fine_tuned_model.model
        everything = dict.fromkeys(select_linear_modules(model, compression.targets))
        computed = svd_reference_losses(
            model,
            fisher_information["tensors"],
            None,
            compression.targets,
            device=compression.device,
            ranks={**everything, **differing},
            **vars(parse_parallel(compression.parallel)),
        )
    return [
        computed[name] if name in computed else float(reference.at[name, "svd_loss"])
        for name in results
    ]


def _info_column(values: list[Any]) -> pd.Series:
    """Floats (None → NaN) when every value is a number or None, else text (None → missing)."""
    if all(value is None or isinstance(value, Real) for value in values):
        return pd.Series([math.nan if value is None else float(value) for value in values])
    return pd.Series([None if value is None else str(value) for value in values])
