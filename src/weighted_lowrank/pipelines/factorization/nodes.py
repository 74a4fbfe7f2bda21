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

from weighted_lowrank.hf import ModelBundle
from weighted_lowrank.lineage import with_fingerprint
from weighted_lowrank.lowrank.compression import (
    apply_factors,
    factorize_model,
    layer_ranks,
    layer_seconds,
    svd_reference_losses,
)
from weighted_lowrank.lowrank.objective import FactorizationResult, relative_loss
from weighted_lowrank.parameters import CompressionParams

#: Columns of ``convergence``: one row per point of a layer's loss history.
CONVERGENCE_COLUMNS = ("module", "step", "seconds", "loss")


def svd_reference(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    compression: CompressionParams,
) -> pd.DataFrame:
    """Plain truncated SVD's Fisher-weighted loss per targeted layer (module, rank, svd_loss).

    Computed once per run at the shared budget; every solver namespace reports its loss relative
    to it (``loss_rel_svd``).
    """
    model = fine_tuned_model.model
    losses = svd_reference_losses(
        model,
        fisher_information["tensors"],
        compression.budget,
        compression.targets,
        device=compression.device,
    )
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in losses}
    ranks = layer_ranks(shapes, compression.budget)
    table = pd.DataFrame(
        {
            "module": list(losses),
            "rank": [ranks[name] for name in losses],
            "svd_loss": list(losses.values()),
        }
    )
    return with_fingerprint(table, fine_tuned_model.model_fingerprint)


def compress(
    fine_tuned_model: ModelBundle,
    fisher_information: dict[str, Any],
    calibration_statistics: dict[str, Any],
    svd_reference_loss: pd.DataFrame,
    compression: CompressionParams,
    options: dict[str, Any],
    *,
    solver: str,
) -> tuple[ModelBundle, pd.DataFrame, pd.DataFrame]:
    """Factorize the targeted layers of the fine-tuned model with ``solver`` at the shared budget.

    ``options`` are the solver's own knobs (``<solver>.options``); ``compression.seed`` is the
    solver's seed unless the options set one. ``calibration_statistics`` holds the input/output
    moments the activation-aware solvers need (``kfwsvd``, ``svd_llm``, ``asvd``); the others
    ignore it, and a solver whose statistics are missing fails before any work. Returns the compressed bundle (same tokenizer), the
    per-layer report (:func:`layer_report`) and the loss histories (:func:`convergence_table`).
    """
    model = fine_tuned_model.model
    torch.manual_seed(compression.seed)
    started = time.perf_counter()
    results = factorize_model(
        model,
        fisher_information["tensors"],
        compression.budget,
        solver,
        compression.targets,
        statistics=calibration_statistics["tensors"],
        device=compression.device,
        **{"seed": compression.seed, **options},
    )
    total_seconds = time.perf_counter() - started
    compressed = dataclasses.replace(fine_tuned_model, model=apply_factors(model, results))
    svd_losses = _reference_losses(svd_reference_loss, results)
    report = layer_report(
        model, results, svd_losses, budget=compression.budget, total_seconds=total_seconds
    )
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
    """One row per factorized layer of ``model`` (the dense one), in ``results`` order.

    Columns: module, budget, shape ("out x in"), out_features, in_features, rank, params_before,
    params_after (weight + bias of that layer), weighted_loss, svd_loss (plain SVD at the same
    rank under the same importance), loss_rel_svd, initial_loss, seconds (the layer's share of
    its batch's wall time), total_seconds (wall time of the whole factorization, the same on every
    row), iterations, stop_reason, solver, then one ``info_<key>`` column per solver-info key
    (float, NaN where a layer has None; text for non-numeric values).
    """
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
    svd_reference_loss: pd.DataFrame, results: Mapping[str, FactorizationResult]
) -> list[float]:
    """SVD's loss per factorized layer, from a reference made at the same targets and ranks."""
    reference = svd_reference_loss.set_index("module")
    differing = [
        name
        for name, result in results.items()
        if name not in reference.index or int(reference.at[name, "rank"]) != result.rank
    ]
    if differing:
        raise ValueError(
            f"svd_reference_loss has no row at the factorized rank for {differing[:5]} "
            f"({len(differing)} of {len(results)} layers): it was made with other compression "
            "parameters; rerun the svd_reference node (e.g. --from-nodes svd_reference)"
        )
    return [float(reference.at[name, "svd_loss"]) for name in results]


def _info_column(values: list[Any]) -> pd.Series:
    """Floats (None → NaN) when every value is a number or None, else text (None → missing)."""
    if all(value is None or isinstance(value, Real) for value in values):
        return pd.Series([math.nan if value is None else float(value) for value in values])
    return pd.Series([None if value is None else str(value) for value in values])
