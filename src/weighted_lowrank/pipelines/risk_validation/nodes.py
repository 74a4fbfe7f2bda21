"""Nodes of ``risk_validation`` that measure each solver's real damage, layer by layer.

A layer's *damage* is the validation-loss increase with that layer alone compressed; its *KL*,
the mean KL(p_dense ‖ p_compressed) (:func:`predictive_kl`), is what a Fisher quadratic
approximates (the loss increase also holds a first-order term g·ΔW). With ``curvature`` the
reference solver's layer is also evaluated at the mirrored weight W + R = 2W − W_svd, so that
L(W − R) = L(W) − g·R + ½ RᵀHR + O(R³) splits into an odd part ``svd_first_order`` and an even
part ``svd_curvature_damage`` ≈ ½ RᵀHR, the only one a Fisher can predict (docs/METHOD.md).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.hf.training import predict_examples, split_metrics
from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import ModelParams, RiskValidationParams
from weighted_lowrank.lowrank.calibration import statistic_key
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.layer import LowRankLinear, lowrank_modules
from weighted_lowrank.lowrank.loss_models import (
    LOSS_MODELS,
    REQUIRED_STATISTICS,
    LayerCurvature,
    predicted_loss_increase,
)

logger = logging.getLogger(__name__)

#: Where each loss-model statistic comes from, for error messages.
STATISTIC_SOURCES = {
    "fisher": "fisher_information '<module>.weight' and its metadata num_examples",
    "input_moment": "calibration_statistics '<module>.input_moment'",
    "output_moment": "calibration_statistics '<module>.output_moment'",
}
#: The ``module`` (and ``kind``) of a whole-model row.
WHOLE_MODEL = "(whole model)"
#: The ``layer_risk`` columns that describe a layer; every table row starts with them.
LAYER_COLUMNS = ["module", "layer", "kind", "rank"]


def layer_curvatures(
    modules: list[str],
    fisher_information: Mapping[str, Any],
    calibration_statistics: Mapping[str, Any],
) -> tuple[dict[str, LayerCurvature], dict[str, list[str]]]:
    """Each module's per-example statistics, and ``{statistic: [absent keys]}``."""
    fisher = fisher_information.get("tensors") or {}
    calibration = calibration_statistics.get("tensors") or {}
    num_examples = (fisher_information.get("metadata") or {}).get("num_examples")
    absent: dict[str, list[str]] = {}
    if num_examples is None:
        absent["fisher"] = ["metadata num_examples"]
    curvatures = {}
    for module in modules:
        values: dict[str, torch.Tensor | None] = {"fisher": None}
        key = f"{module}.weight"
        if num_examples is not None and key in fisher:
            values["fisher"] = fisher[key].double() / int(num_examples)
        elif num_examples is not None:
            absent.setdefault("fisher", []).append(key)
        for statistic in ("input_moment", "output_moment"):
            key = statistic_key(module, statistic)
            values[statistic] = calibration.get(key)
            if values[statistic] is None:
                absent.setdefault(statistic, []).append(key)
        curvatures[module] = LayerCurvature(**values)
    return curvatures, absent


def resolve_loss_models(requested: list[str] | None, absent: Mapping[str, list[str]]) -> list[str]:
    """The requested loss models (their statistics absent: an error), or (``None``) every one
    the statistics allow, the others skipped with a warning."""
    requested_names = list(requested or ())
    wrong = [
        name
        for index, name in enumerate(requested_names)
        if name not in LOSS_MODELS or name in requested_names[:index]
    ]
    if wrong:
        raise ValueError(
            f"risk_validation.loss_models={requested} names {wrong} unknown or more than once; "
            f"expected distinct names among {list(LOSS_MODELS)}, or null (every one the "
            "statistics allow)"
        )
    chosen = LOSS_MODELS if requested is None else requested
    lacking = {
        model: [name for name in REQUIRED_STATISTICS[model] if name in absent] for model in chosen
    }
    lacking = {model: names for model, names in lacking.items() if names}
    details = "; ".join(
        f"{model} needs "
        + ", ".join(
            f"{STATISTIC_SOURCES[name]} (absent: {absent[name][:3]}"
            + (f" and {len(absent[name]) - 3} more)" if len(absent[name]) > 3 else ")")
            for name in names
        )
        for model, names in lacking.items()
    )
    if requested is not None and lacking:
        raise ValueError(
            f"risk_validation.loss_models {list(lacking)} lack statistics: {details}; run "
            "fisher_estimation with the calibration statistics, or leave them out"
        )
    if len(lacking) == len(LOSS_MODELS):
        raise ValueError(f"no loss model can be computed: {details}")
    if lacking:
        logger.warning("risk_validation: skipping loss models %s: %s", list(lacking), details)
    return [model for model in chosen if model not in lacking]


def predictive_kl(reference: np.ndarray, logits: np.ndarray, config: object) -> np.ndarray:
    """Per-example KL(p_reference ‖ p_logits) in nats of the head's distributions."""
    a = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"logits of shapes {tuple(a.shape)} and {tuple(b.shape)}: expected two "
            "equal (examples, num_labels)"
        )
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "regression" or a.shape[1] == 1:
        kl = 0.5 * (a - b).pow(2).sum(dim=1)
    elif problem_type == "multi_label_classification":
        log_sigmoid = torch.nn.functional.logsigmoid
        log_p, log_q, log_not_p, log_not_q = (log_sigmoid(x) for x in (a, b, -a, -b))
        kl = (log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)).sum(dim=1)
    else:
        log_p, log_q = torch.log_softmax(a, dim=1), torch.log_softmax(b, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return kl.clamp_min(0.0).numpy()  # rounding puts near-identical distributions ulp below 0


def _validation_pass(
    network: torch.nn.Module,
    bundle: ModelBundle,
    validation_split: pd.DataFrame,
    model: ModelParams,
    risk_validation: RiskValidationParams,
    device: torch.device,
) -> tuple[float, float, np.ndarray | None]:
    """Loss, accuracy and logits (None for a language model) of one pass."""
    frame = validation_split.head(risk_validation.max_examples)  # None: every row
    result = predict_examples(
        network,
        bundle.tokenizer,
        frame,
        model.max_length,
        batch_size=risk_validation.batch_size,
        device=device,
    )
    scores = split_metrics(result, frame)
    if result.causal_lm:
        return result.loss, scores["token_accuracy"], None
    return result.loss, scores.get("accuracy", math.nan), result.logits


def measure_dense_reference(
    fine_tuned_model: ModelBundle,
    validation_split: pd.DataFrame,
    layer_risk: pd.DataFrame,
    fisher_information: dict[str, Any],
    calibration_statistics: dict[str, Any],
    model: ModelParams,
    risk_validation: RiskValidationParams,
    device: str,
) -> dict[str, Any]:
    """The dense model's validation loss, accuracy, logits and loss models."""
    modules = layer_risk["module"].tolist()
    _, absent = layer_curvatures(modules, fisher_information, calibration_statistics)
    loss_models = resolve_loss_models(risk_validation.loss_models, absent)
    run_device = resolve_device(device)
    network = copy.deepcopy(fine_tuned_model.model).to(run_device).eval()
    loss, accuracy, logits = _validation_pass(
        network, fine_tuned_model, validation_split, model, risk_validation, run_device
    )
    reference = {
        "loss": loss,
        "accuracy": accuracy,
        "logits": logits,
        "examples": len(validation_split.head(risk_validation.max_examples)),
        "loss_models": loss_models,
    }
    return with_fingerprint(reference, model_fingerprint(fine_tuned_model.model))


def check_layers(
    solver: str, compressed: torch.nn.Module, layer_risk: pd.DataFrame
) -> dict[str, LowRankLinear]:
    """``{module: layer}`` of ``compressed``, once it matches ``layer_risk``'s ranks."""
    layers = lowrank_modules(compressed)
    expected = {
        module: int(rank)
        for module, rank in zip(layer_risk["module"], layer_risk["rank"], strict=True)
    }
    duplicated = len(expected) != len(layer_risk)
    if duplicated or expected != {name: layer.rank for name, layer in layers.items()}:
        ranks = {
            name: (rank, layers[name].rank)
            for name, rank in expected.items()
            if name in layers and layers[name].rank != rank
        }
        raise ValueError(
            f"layer_risk and {solver}.compressed_model differ: modules only in layer_risk "
            f"{sorted(set(expected) - set(layers))[:5]}, only in the model "
            f"{sorted(set(layers) - set(expected))[:5]}, ranks (layer_risk, model) "
            f"{dict(list(ranks.items())[:5])}"
            + (", duplicated layer_risk rows" if duplicated else "")
            + "; make both from one run at one budget and targets, with "
            "compression.allocation=uniform (a global allocation gives each solver its own ranks)"
        )
    return {name: layers[name] for name in expected}


def measure_damage(
    compressed_model: ModelBundle,
    dense_reference: dict[str, Any],
    fine_tuned_model: ModelBundle,
    validation_split: pd.DataFrame,
    layer_risk: pd.DataFrame,
    fisher_information: dict[str, Any],
    calibration_statistics: dict[str, Any],
    model: ModelParams,
    risk_validation: RiskValidationParams,
    device: str,
    *,
    solver: str,
    mirror: bool = False,
) -> pd.DataFrame:
    """One solver's damage per ``layer_risk`` row alone, then the whole model's."""
    dense, loss_models = fine_tuned_model.model, dense_reference["loss_models"]
    layers = check_layers(solver, compressed_model.model, layer_risk)
    curvatures, _ = layer_curvatures(list(layers), fisher_information, calibration_statistics)
    run_device = resolve_device(device)
    working = copy.deepcopy(dense).to(run_device).eval()

    def evaluate(network: torch.nn.Module = working) -> dict[str, float]:
        loss, accuracy, logits = _validation_pass(
            network, fine_tuned_model, validation_split, model, risk_validation, run_device
        )
        if logits is None:
            return {"loss": loss, "accuracy": accuracy, "kl": math.nan}
        kl = predictive_kl(dense_reference["logits"], logits, dense.config).mean()
        return {"loss": loss, "accuracy": accuracy, "kl": float(kl)}

    rows = []
    for index, (name, layer) in enumerate(layers.items()):
        started = time.perf_counter()
        row = _swap_in(working, name, layer, evaluate, mirror and risk_validation.curvature)
        row["seconds"] = time.perf_counter() - started
        with torch.no_grad():
            weight = dense.get_submodule(name).weight
            delta = weight.double() - layer.dense_weight().to(weight).double()
        rows.append({**row, **predicted_loss_increase(delta, curvatures[name], loss_models)})
        _log(f"{solver} {index + 1}/{len(layers)} {name}", row, dense_reference)
    started = time.perf_counter()
    whole = evaluate(copy.deepcopy(compressed_model.model).to(run_device).eval())
    whole.update(module=WHOLE_MODEL, seconds=time.perf_counter() - started)
    _log(f"{solver} whole model", whole, dense_reference)
    whole.update({name: sum(row[name] for row in rows) for name in loss_models})
    return pd.DataFrame([*rows, whole])


def _log(what: str, row: Mapping[str, Any], dense: Mapping[str, Any]) -> None:
    increase, kl, seconds = row["loss"] - dense["loss"], row["kl"], row["seconds"]
    logger.info(
        "risk_validation %s: loss increase %.4g, KL %.4g (%.1f s)", what, increase, kl, seconds
    )


def _swap_in(
    working: torch.nn.Module,
    name: str,
    layer: LowRankLinear,
    evaluate: Callable[[], dict[str, float]],
    mirror: bool,
) -> dict[str, Any]:
    """:func:`measure_damage`'s row with ``name`` replaced by ``layer`` (then restored)."""
    original = working.get_submodule(name)
    working.set_submodule(name, copy.deepcopy(layer).to(original.weight.device))
    try:
        row = {"module": name, **evaluate()}
        if mirror:
            mirrored = copy.deepcopy(original)
            approximation = layer.dense_weight().detach()
            with torch.no_grad():
                mirrored.weight.copy_(2 * original.weight - approximation.to(original.weight))
            working.set_submodule(name, mirrored)
            row["mirror_loss"] = evaluate()["loss"]
    finally:
        working.set_submodule(name, original)
    return row


def collect_damage(
    layer_risk: pd.DataFrame,
    dense_reference: dict[str, Any],
    *,
    reference: str,
    weighted: str,
    **damage: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``risk_validation_table`` and ``loss_model_table`` from every solver's damage."""
    layers = layer_risk.reset_index(drop=True)
    per_layer = {solver: frame.iloc[:-1] for solver, frame in damage.items()}
    fingerprint = fingerprint_of(dense_reference)
    return (
        with_fingerprint(
            _risk_table(layers, per_layer, dense_reference, reference, weighted), fingerprint
        ),
        with_fingerprint(_loss_model_table(layers, damage, dense_reference), fingerprint),
    )


def _risk_table(
    layers: pd.DataFrame,
    damage: Mapping[str, pd.DataFrame],
    dense: Mapping[str, Any],
    reference: str,
    weighted: str,
) -> pd.DataFrame:
    """``layers`` (descriptive columns first) with the two solvers' measurements appended."""
    table = layers[LAYER_COLUMNS + [column for column in layers if column not in LAYER_COLUMNS]]
    pair = {solver: damage[solver] for solver in (reference, weighted)}
    for solver, measured in pair.items():
        table[f"{solver}_loss"] = measured["loss"]
        table[f"{solver}_accuracy"] = measured["accuracy"]
    for solver, measured in pair.items():
        table[f"{solver}_kl"] = measured["kl"]
    for solver, measured in pair.items():
        table[f"{solver}_loss_increase"] = measured["loss"] - dense["loss"]
    for solver, measured in pair.items():
        table[f"{solver}_accuracy_drop"] = dense["accuracy"] - measured["accuracy"]
    table["weighted_gain"] = (
        table[f"{reference}_loss_increase"] - table[f"{weighted}_loss_increase"]
    )
    if "mirror_loss" in pair[reference].columns:
        loss, mirror = pair[reference]["loss"], pair[reference]["mirror_loss"]
        table[f"{reference}_mirror_loss"] = mirror
        table[f"{reference}_first_order"] = (loss - mirror) / 2
        table[f"{reference}_curvature_damage"] = (loss + mirror) / 2 - dense["loss"]
    table["seconds"] = sum(measured["seconds"] for measured in damage.values())
    table["dense_loss"] = dense["loss"]
    table["dense_accuracy"] = dense["accuracy"]
    table["examples"] = dense["examples"]
    return table


def _loss_model_table(
    layers: pd.DataFrame, damage: Mapping[str, pd.DataFrame], dense: Mapping[str, Any]
) -> pd.DataFrame:
    """Predicted against measured damage, layer rows then whole models, with their ratios."""
    whole = {"module": WHOLE_MODEL, "layer": -1, "kind": WHOLE_MODEL, "rank": -1}
    points = [
        ("layer", {"module": module, "layer": int(layer), "kind": kind, "rank": int(rank)}, index)
        for index, (module, layer, kind, rank) in enumerate(layers[LAYER_COLUMNS].itertuples(False))
    ]
    rows = [
        {
            "scope": scope,
            **where,
            "solver": solver,
            "loss_model": loss_model,
            "predicted": measured[loss_model],
            "measured_kl": measured["kl"],
            "measured": measured["loss"] - dense["loss"],
            "accuracy_drop": dense["accuracy"] - measured["accuracy"],
        }
        for scope, where, index in [*points, ("model", whole, -1)]
        for solver in damage
        for measured in [damage[solver].iloc[index]]
        for loss_model in dense["loss_models"]
    ]
    table = pd.DataFrame(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        for measured, ratio in (("measured_kl", "ratio_kl"), ("measured", "ratio")):
            table.insert(
                table.columns.get_loc(measured) + 1, ratio, table["predicted"] / table[measured]
            )
    table["dense_loss"] = dense["loss"]
    table["examples"] = dense["examples"]
    return table
