"""Nodes of ``risk_validation``: which statistic or loss model predicts the real damage?

Every targeted layer is compressed alone — its ``LowRankLinear`` taken from each validated
solver's compressed model, swapped into a copy of the dense model — and the validation loss and
accuracy are measured; then each solver's whole compressed model is measured too. A layer's
*damage* is the validation-loss increase over the dense model; from the same passes' logits, its
*KL* is the mean over validation examples of KL(p_dense ‖ p_compressed)
(:func:`predictive_kl`), the quantity a Fisher quadratic approximates: the loss increase also
holds a first-order term g·ΔW (the validation gradient g is not zero) that no quadratic predicts.

Two comparisons use these measurements:

- **risk statistics** (``risk_validation_table``): Spearman correlations of each statistic of
  ``layer_risk`` (φ by default) with SVD's damage and with the *weighted gain* (SVD's damage minus
  ``tfwsvd``'s);
- **loss models** (``loss_model_table``): for every layer × solver and every whole model, the
  predicted ΔL = ½ vec(ΔW)ᵀ F vec(ΔW) of each loss model of
  :mod:`weighted_lowrank.lowrank.loss_models` (ΔW from that solver's factors; a whole model's
  prediction is the sum over its layers) against the measured KL (primary) and the measured
  loss increase.

With ``curvature`` the layer is also evaluated with the mirrored weight W + R = 2W − W_svd (R the
SVD residual). Writing L(W − R) = L(W) − g·R + ½ RᵀHR + O(R³), the odd (first-order) part
``svd_first_order`` = (L(W − R) − L(W + R)) / 2 and the even part ``svd_curvature_damage`` =
(L(W − R) + L(W + R)) / 2 − L(W) ≈ ½ RᵀHR separate; a Fisher statistic can only predict the
even part, since the Fisher knows nothing of the validation gradient's sign.
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
from matplotlib.figure import Figure
from scipy import stats

from weighted_lowrank.hf.models import ModelBundle
from weighted_lowrank.hf.training import language_model_metrics, predict_examples, task_metrics
from weighted_lowrank.kedro_glue.lineage import fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameters import ModelParams, RiskValidationParams
from weighted_lowrank.lowrank.calibration import statistic_key
from weighted_lowrank.lowrank.devices import resolve_device
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.layer import lowrank_modules, lowrank_ranks
from weighted_lowrank.lowrank.loss_models import (
    LOSS_MODELS,
    REQUIRED_STATISTICS,
    LayerCurvature,
    predicted_loss_increase,
)
from weighted_lowrank.lowrank.risk import RISK_STATISTICS
from weighted_lowrank.lowrank.risk import spearman as spearman_rho
from weighted_lowrank.lowrank.targets import ordered_kinds

logger = logging.getLogger(__name__)

#: The element-wise weighted solver whose compressed model is compared with ``svd``'s.
WEIGHTED_SOLVER = "tfwsvd"
#: The solvers whose ``<solver>.compressed_model`` the pipeline wires in, so the ones
#: ``risk_validation.solvers`` may name (pipelines are built before parameters are read). One
#: closed form or solver per loss model — svd (identity), fwsvd (rank-one Fisher), tfwsvd
#: (diagonal; the other element-wise solvers minimise the same objective), kfwsvd (Kronecker),
#: svd_llm (activation) — and asvd; every wired model is loaded, and must come from the same run.
VALIDATED_SOLVERS: tuple[str, ...] = ("svd", "fwsvd", WEIGHTED_SOLVER, "kfwsvd", "svd_llm", "asvd")
#: Solvers every run measures: the risk-statistic comparison needs SVD's damage and the gain.
REQUIRED_SOLVERS: tuple[str, ...] = ("svd", WEIGHTED_SOLVER)
#: Where each loss-model statistic comes from, for error messages.
STATISTIC_SOURCES = {
    "fisher": "fisher_information '<module>.weight' and its metadata num_examples",
    "input_moment": "calibration_statistics '<module>.input_moment'",
    "output_moment": "calibration_statistics '<module>.output_moment'",
}
#: The ``module`` (and ``kind``) of a whole-model row of ``loss_model_table``.
WHOLE_MODEL = "(whole model)"
#: What the statistics are correlated with (when in the table): short name for MLflow metrics.
OUTCOMES = {
    "svd_kl": "kl",
    "svd_loss_increase": "damage",
    "weighted_gain": "gain",
    "svd_curvature_damage": "curvature",
}
#: Columns of ``layer_risk`` that are not statistics.
_DESCRIPTIVE = (
    "module",
    "layer",
    "kind",
    "rank",
    "out_features",
    "in_features",
    "risk",
    "model_fingerprint",
)
#: Columns :func:`measure_layer_damage` adds to ``risk_validation_table`` (not statistics).
_MEASURED = (
    *(
        f"{solver}_{name}"
        for solver in REQUIRED_SOLVERS
        for name in ("loss", "accuracy", "kl", "loss_increase", "accuracy_drop")
    ),
    "weighted_gain",
    "svd_mirror_loss",
    "svd_first_order",
    "svd_curvature_damage",
    "seconds",
    "dense_loss",
    "dense_accuracy",
    "examples",
)


def check_solvers(requested: list[str], compressed_models: Mapping[str, ModelBundle]) -> list[str]:
    """``risk_validation.solvers`` once every name is wired in, listed once, with svd and tfwsvd."""
    unknown = [name for name in requested if name not in compressed_models]
    if unknown:
        raise ValueError(
            f"risk_validation.solvers names {unknown}; expected solvers whose compressed models "
            f"the pipeline loads: {list(compressed_models)} (VALIDATED_SOLVERS in "
            "pipelines/risk_validation/nodes.py)"
        )
    twice = sorted({name for name in requested if requested.count(name) > 1})
    if twice:
        raise ValueError(f"risk_validation.solvers lists {twice} more than once")
    lacking = [name for name in REQUIRED_SOLVERS if name not in requested]
    if lacking:
        raise ValueError(
            f"risk_validation.solvers={requested} lacks {lacking}: the risk-statistic comparison "
            f"measures SVD's damage and {WEIGHTED_SOLVER}'s gain over it; add them"
        )
    return list(requested)


def check_layers(models: Mapping[str, torch.nn.Module], layer_risk: pd.DataFrame) -> dict[str, int]:
    """``{module: rank}`` in ``layer_risk`` order, once the models and the table agree on modules
    and ranks (``models`` maps solver names to compressed models and holds ``svd``).

    Lineage (``hooks.LineageCheck``) says the inputs come from one fine-tuned model; it cannot
    tell that they were compressed at one budget and targets, which this checks.
    """
    svd = lowrank_ranks(models["svd"])
    if not svd:
        raise ValueError("svd.compressed_model has no LowRankLinear modules")
    for solver, compressed in models.items():
        other = lowrank_ranks(compressed)
        if other == svd:
            continue
        only_svd = sorted(set(svd) - set(other))
        only_other = sorted(set(other) - set(svd))
        ranks = {
            name: (svd[name], other[name])
            for name in svd
            if name in other and svd[name] != other[name]
        }
        raise ValueError(
            f"svd.compressed_model and {solver}.compressed_model differ: modules only in svd "
            f"{only_svd[:5]}, only in {solver} {only_other[:5]}, ranks (svd, {solver}) "
            f"{dict(list(ranks.items())[:5])}; load both from one run made with "
            "compression.allocation=uniform (a global allocation gives each solver its own ranks)"
        )
    for column in ("module", "kind", "layer"):
        if column not in layer_risk.columns:
            raise ValueError(f"layer_risk lacks the column {column!r}; it has {list(layer_risk)}")
    modules = layer_risk["module"].tolist()
    if len(set(modules)) != len(modules) or set(modules) != set(svd):
        raise ValueError(
            f"layer_risk's modules differ from the compressed models': only in layer_risk "
            f"{sorted(set(modules) - set(svd))[:5]}, only in the models "
            f"{sorted(set(svd) - set(modules))[:5]}"
            + (", duplicated rows" if len(set(modules)) != len(modules) else "")
            + "; rerun svd_risk on the same model and budget"
        )
    if "rank" in layer_risk.columns:
        wrong = {
            module: (int(rank), svd[module])
            for module, rank in zip(layer_risk["module"], layer_risk["rank"], strict=True)
            if int(rank) != svd[module]
        }
        if wrong:
            raise ValueError(
                f"layer_risk's ranks differ from the compressed models' (layer_risk, models): "
                f"{dict(list(wrong.items())[:5])}; were they built at the same budget?"
            )
    return {module: svd[module] for module in modules}


def layer_curvatures(
    modules: list[str],
    fisher_information: Mapping[str, Any],
    calibration_statistics: Mapping[str, Any],
) -> tuple[dict[str, LayerCurvature], dict[str, list[str]]]:
    """Each module's per-example statistics, and ``{statistic: [absent keys]}`` for the absent.

    The diagonal Fisher is stored summed over examples: it is divided by its metadata's
    ``num_examples`` (absent: the Fisher counts as absent). A and G are stored per example.
    """
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


def resolve_loss_models(
    requested: list[str] | None, absent: Mapping[str, list[str]]
) -> tuple[list[str], dict[str, list[str]]]:
    """The loss models to compute and ``{skipped loss model: [statistics it lacks]}``.

    ``requested=None`` takes every loss model whose statistics every layer has, and skips the
    others (logged); a requested one whose statistics are absent is an error naming them.
    """
    unknown = [name for name in requested or () if name not in LOSS_MODELS]
    if unknown:
        raise ValueError(
            f"risk_validation.loss_models names {unknown}; expected some of {list(LOSS_MODELS)} "
            "or null (every one the statistics allow)"
        )
    twice = sorted({name for name in requested or () if requested.count(name) > 1})
    if twice:
        raise ValueError(f"risk_validation.loss_models lists {twice} more than once")
    lacking = {
        model: [name for name in REQUIRED_STATISTICS[model] if name in absent]
        for model in (LOSS_MODELS if requested is None else requested)
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
    chosen = LOSS_MODELS if requested is None else requested
    return [model for model in chosen if model not in lacking], lacking


def predict_damage(
    dense: torch.nn.Module,
    models: Mapping[str, torch.nn.Module],
    curvatures: Mapping[str, LayerCurvature],
    loss_models: list[str],
) -> dict[tuple[str, str], dict[str, float]]:
    """``{(solver, module): {loss model: predicted ΔL}}`` with ΔW = W − AB of that solver's layer."""
    predictions = {}
    for solver, compressed in models.items():
        layers = lowrank_modules(compressed)
        for module, curvature in curvatures.items():
            with torch.no_grad():
                weight = dense.get_submodule(module).weight
                delta = weight.double() - layers[module].dense_weight().to(weight).double()
            predictions[solver, module] = predicted_loss_increase(delta, curvature, loss_models)
    return predictions


def predictive_kl(reference: np.ndarray, logits: np.ndarray, config: object) -> np.ndarray:
    """Per-example KL(p_reference ‖ p_logits) in nats, from two models' (examples, num_labels)
    logits, for the predictive distribution of the task's head (``config.problem_type`` and
    ``num_labels`` as in :func:`weighted_lowrank.hf.training.per_example_loss`):

    - classification: the categorical distributions softmax(logits);
    - ``multi_label_classification``: the sum over labels of the Bernoulli KLs, p = sigmoid(logit);
    - regression (``num_labels == 1``): Gaussians of unit variance centred on the outputs, whose
      KL is ½ (y_reference − y)².

    Computed in float64; rounding can make a KL of two near-identical distributions a few ulp
    below zero, so each is clipped at 0 (a KL is never negative).
    """
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
        log_p, log_q = torch.nn.functional.logsigmoid(a), torch.nn.functional.logsigmoid(b)
        log_not_p, log_not_q = (
            torch.nn.functional.logsigmoid(-a),
            torch.nn.functional.logsigmoid(-b),
        )
        kl = (log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)).sum(dim=1)
    else:
        log_p, log_q = torch.log_softmax(a, dim=1), torch.log_softmax(b, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return kl.clamp_min(0.0).numpy()


def measure_layer_damage(
    fine_tuned_model: ModelBundle,
    validation_split: pd.DataFrame,
    layer_risk: pd.DataFrame,
    fisher_information: dict[str, Any],
    calibration_statistics: dict[str, Any],
    model: ModelParams,
    risk_validation: RiskValidationParams,
    device: str,
    **compressed_models: ModelBundle,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation loss and accuracy with each targeted layer compressed alone by each solver in
    ``risk_validation.solvers`` (and with each solver's whole model), against the loss models.

    ``compressed_models`` maps solver names to their compressed models (the pipeline passes
    every one of :data:`VALIDATED_SOLVERS`). Every input is checked before the first evaluation.
    Returns:

    - ``risk_validation_table``: one row per ``layer_risk`` row: its columns, then ``svd_loss``,
      ``tfwsvd_loss``, ``svd_accuracy``, ``tfwsvd_accuracy``, ``svd_kl`` / ``tfwsvd_kl`` (mean
      KL(p_dense ‖ p_compressed), :func:`predictive_kl`), ``svd_loss_increase`` /
      ``tfwsvd_loss_increase`` (over the dense model), ``svd_accuracy_drop`` /
      ``tfwsvd_accuracy_drop``, ``weighted_gain`` (SVD's loss increase minus tfwsvd's), with
      ``risk_validation.curvature`` also ``svd_mirror_loss`` (weight 2W − W_svd),
      ``svd_first_order`` and ``svd_curvature_damage`` (module docstring), then ``seconds`` (the
      layer's evaluations, every solver) and the constants ``dense_loss``, ``dense_accuracy``,
      ``examples``;
    - ``loss_model_table``: see :func:`loss_model_table`.

    Accuracies are NaN for a regression model. ``risk_validation.max_examples`` keeps the first
    rows of the split (it is shuffled). Each configuration is one validation pass: its loss,
    accuracy and KL all come from the logits of that pass and of the dense model's pass.
    """
    solvers = check_solvers(risk_validation.solvers, compressed_models)
    models = {solver: compressed_models[solver].model for solver in solvers}
    ranks = check_layers(models, layer_risk)
    curvatures, absent = layer_curvatures(list(ranks), fisher_information, calibration_statistics)
    loss_models, _ = resolve_loss_models(risk_validation.loss_models, absent)
    predictions = predict_damage(fine_tuned_model.model, models, curvatures, loss_models)

    frame = validation_split
    if risk_validation.max_examples is not None:
        frame = frame.head(risk_validation.max_examples)
    run_device = resolve_device(device)
    working = copy.deepcopy(fine_tuned_model.model).to(run_device).eval()

    config = fine_tuned_model.model.config

    def predict(network: torch.nn.Module) -> tuple[float, float, np.ndarray | None]:
        result = predict_examples(
            network,
            fine_tuned_model.tokenizer,
            frame,
            model.max_length,
            batch_size=risk_validation.batch_size,
            device=run_device,
        )
        if result.causal_lm:  # its vocabulary logits are not kept: no KL, token accuracy
            return result.loss, language_model_metrics(result)["token_accuracy"], None
        scores = task_metrics(result.logits, frame["label"].to_numpy())
        return result.loss, scores.get("accuracy", math.nan), result.logits

    dense_loss, dense_accuracy, dense_logits = predict(working)

    def evaluate(network: torch.nn.Module = working) -> tuple[float, float, float]:
        """Loss, accuracy and mean KL(p_dense ‖ p_network) of one validation pass (a language
        model's: mean next-token loss, token accuracy, KL NaN)."""
        loss, accuracy, logits = predict(network)
        if logits is None:
            return loss, accuracy, math.nan
        return loss, accuracy, float(predictive_kl(dense_logits, logits, config).mean())

    measured = _measure_layers(
        working, list(ranks), models, evaluate, risk_validation.curvature, run_device, dense_loss
    )
    whole = {
        solver: evaluate(copy.deepcopy(compressed).to(run_device).eval())
        for solver, compressed in models.items()
    }
    logger.info(
        "risk_validation whole models: loss increase, KL %s",
        ", ".join(
            f"{solver} {loss - dense_loss:.4g}, {kl:.4g}" for solver, (loss, _, kl) in whole.items()
        ),
    )
    risk_table = _damage_table(layer_risk, measured, dense_loss, dense_accuracy)
    risk_table["examples"] = len(frame)
    losses = loss_model_table(
        layer_risk, measured, whole, predictions, dense_loss, dense_accuracy, len(frame)
    )
    fingerprint = model_fingerprint(fine_tuned_model.model)
    return with_fingerprint(risk_table, fingerprint), with_fingerprint(losses, fingerprint)


def _measure_layers(
    working: torch.nn.Module,
    modules: list[str],
    models: Mapping[str, torch.nn.Module],
    evaluate: Callable[[], tuple[float, float, float]],
    curvature: bool,
    device: torch.device,
    dense_loss: float,
) -> pd.DataFrame:
    """One row per module of :func:`_measure_layer`'s losses, accuracies and KLs, and
    ``seconds``."""
    rows = []
    for index, name in enumerate(modules):
        started = time.perf_counter()
        row = _measure_layer(working, name, models, evaluate, curvature, device)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        logger.info(
            "risk_validation %d/%d %s: loss increase, KL %s (%.1f s)",
            index + 1,
            len(modules),
            name,
            ", ".join(
                f"{solver} {row[f'{solver}_loss'] - dense_loss:.4g}, {row[f'{solver}_kl']:.4g}"
                for solver in models
            ),
            row["seconds"],
        )
    return pd.DataFrame(rows)


def _measure_layer(
    working: torch.nn.Module,
    name: str,
    sources: Mapping[str, torch.nn.Module],
    evaluate: Callable[[], tuple[float, float, float]],
    curvature: bool,
    device: torch.device,
) -> dict[str, float]:
    """Loss, accuracy and KL from the dense model of ``working`` with its layer ``name`` taken
    from each source in turn (and, with ``curvature``, the loss with the mirrored weight
    2W − W_svd); ``working`` is restored."""
    row: dict[str, float] = {}
    original = working.get_submodule(name)
    for solver, source in sources.items():
        working.set_submodule(name, copy.deepcopy(source.get_submodule(name)).to(device))
        try:
            row[f"{solver}_loss"], row[f"{solver}_accuracy"], row[f"{solver}_kl"] = evaluate()
        finally:
            working.set_submodule(name, original)
    if curvature:
        mirrored = copy.deepcopy(original)
        approximation = sources["svd"].get_submodule(name).dense_weight().detach()
        with torch.no_grad():
            mirrored.weight.copy_(2 * original.weight - approximation.to(original.weight))
        working.set_submodule(name, mirrored)
        try:
            row["svd_mirror_loss"], _, _ = evaluate()
        finally:
            working.set_submodule(name, original)
    return row


def loss_model_table(
    layer_risk: pd.DataFrame,
    measured: pd.DataFrame,
    whole: Mapping[str, tuple[float, float, float]],
    predictions: Mapping[tuple[str, str], Mapping[str, float]],
    dense_loss: float,
    dense_accuracy: float,
    examples: int,
) -> pd.DataFrame:
    """The long table: one row per (layer, solver, loss model), then per (whole model, loss model).

    Columns ``scope`` ("layer" or "model"), ``module``, ``layer``, ``kind``, ``rank`` (a whole
    model's: module ``"(whole model)"``, layer and rank −1), ``solver``, ``loss_model``,
    ``predicted`` (½ vec(ΔW)ᵀ F vec(ΔW) in nats per example; a whole model's is the sum over its
    layers), ``measured_kl`` (mean KL(p_dense ‖ p_compressed) over the validation examples, the
    primary outcome), ``ratio_kl`` (predicted / measured_kl), ``measured`` (validation-loss
    increase over the dense model), ``ratio`` (predicted / measured), ``accuracy_drop``, and the
    constants ``dense_loss``, ``examples``. ``measured`` holds one row per ``layer_risk`` row with
    ``<solver>_loss`` / ``_accuracy`` / ``_kl``; ``whole`` maps solvers to (loss, accuracy, KL).
    """
    solvers = list(whole)
    layers = layer_risk.reset_index(drop=True)
    rows = []
    for index, layer in layers.iterrows():
        for solver in solvers:
            loss, accuracy, kl = measured.loc[
                index, [f"{solver}_loss", f"{solver}_accuracy", f"{solver}_kl"]
            ]
            for loss_model, value in predictions[solver, layer["module"]].items():
                rows.append(
                    {
                        "scope": "layer",
                        "module": layer["module"],
                        "layer": int(layer["layer"]),
                        "kind": layer["kind"],
                        "rank": int(layer["rank"]) if "rank" in layers.columns else -1,
                        "solver": solver,
                        "loss_model": loss_model,
                        "predicted": value,
                        "measured_kl": kl,
                        "measured": loss - dense_loss,
                        "accuracy_drop": dense_accuracy - accuracy,
                    }
                )
    for solver, (loss, accuracy, kl) in whole.items():
        totals: dict[str, float] = {}
        for module in layers["module"]:
            for loss_model, value in predictions[solver, module].items():
                totals[loss_model] = totals.get(loss_model, 0.0) + value
        for loss_model, value in totals.items():
            rows.append(
                {
                    "scope": "model",
                    "module": WHOLE_MODEL,
                    "layer": -1,
                    "kind": WHOLE_MODEL,
                    "rank": -1,
                    "solver": solver,
                    "loss_model": loss_model,
                    "predicted": value,
                    "measured_kl": kl,
                    "measured": loss - dense_loss,
                    "accuracy_drop": dense_accuracy - accuracy,
                }
            )
    table = pd.DataFrame(rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        table.insert(
            table.columns.get_loc("measured_kl") + 1,
            "ratio_kl",
            table["predicted"] / table["measured_kl"],
        )
        table.insert(
            table.columns.get_loc("measured") + 1, "ratio", table["predicted"] / table["measured"]
        )
    table["dense_loss"] = dense_loss
    table["examples"] = examples
    return table


def _damage_table(
    layer_risk: pd.DataFrame, results: pd.DataFrame, dense_loss: float, dense_accuracy: float
) -> pd.DataFrame:
    """``layer_risk`` (descriptive columns first) with the measured columns appended."""
    table = layer_risk.reset_index(drop=True).copy()
    first = [column for column in ("module", "layer", "kind", "rank") if column in table.columns]
    table = table[first + [column for column in table.columns if column not in first]]
    solvers = ("svd", WEIGHTED_SOLVER)
    for solver in solvers:
        table[f"{solver}_loss"] = results[f"{solver}_loss"]
        table[f"{solver}_accuracy"] = results[f"{solver}_accuracy"]
    for solver in solvers:
        table[f"{solver}_kl"] = results[f"{solver}_kl"]
    for solver in solvers:
        table[f"{solver}_loss_increase"] = results[f"{solver}_loss"] - dense_loss
    for solver in solvers:
        table[f"{solver}_accuracy_drop"] = dense_accuracy - results[f"{solver}_accuracy"]
    table["weighted_gain"] = table["svd_loss_increase"] - table[f"{WEIGHTED_SOLVER}_loss_increase"]
    if "svd_mirror_loss" in results.columns:
        table["svd_mirror_loss"] = results["svd_mirror_loss"]
        table["svd_first_order"] = (results["svd_loss"] - results["svd_mirror_loss"]) / 2
        table["svd_curvature_damage"] = (
            results["svd_loss"] + results["svd_mirror_loss"]
        ) / 2 - dense_loss
    table["seconds"] = results["seconds"]
    table["dense_loss"] = dense_loss
    table["dense_accuracy"] = dense_accuracy
    return table


def _statistics(table: pd.DataFrame, requested: list[str] | None) -> list[str]:
    """The statistics to correlate: the requested ones, or every risk statistic in the table."""
    if requested is None:
        return [name for name in RISK_STATISTICS if name in table.columns]
    available = [c for c in table.columns if c not in _DESCRIPTIVE and c not in _MEASURED]
    wrong = [name for name in requested if name not in available]
    if wrong:
        raise ValueError(
            f"risk_validation.statistics {wrong} are not statistic columns of layer_risk; it has "
            f"{available}"
        )
    return list(requested)


def spearman(x: pd.Series, y: pd.Series) -> dict[str, float | int | None]:
    """Spearman ρ, its two-sided p-value and n over the rows where both are finite.

    ρ and p are ``None`` (JSON null) for fewer than three rows or a constant column.
    """
    both = pd.DataFrame({"x": x, "y": y}).astype(float).replace([np.inf, -np.inf], np.nan).dropna()
    n = len(both)
    if n < 3 or both["x"].nunique() < 2 or both["y"].nunique() < 2:
        return {"rho": None, "p_value": None, "n": n}
    result = stats.spearmanr(both["x"], both["y"])
    return {"rho": spearman_rho(both["x"], both["y"]), "p_value": float(result.pvalue), "n": n}


def summarize_risk_validation(
    risk_validation_table: pd.DataFrame, risk_validation: RiskValidationParams
) -> dict[str, Any]:
    """Spearman correlations of every statistic with SVD's KL, SVD's damage and the weighted gain.

    ``correlations[outcome][statistic]`` is ``{"rho", "p_value", "n"}`` for the outcomes
    ``svd_kl`` (SVD's per-layer KL(p_dense ‖ p_compressed); absent from tables written before
    it was measured), ``svd_loss_increase``, ``weighted_gain`` and, when measured,
    ``svd_curvature_damage``;
    ``best_predictor[outcome]`` is the statistic with the largest ρ (every statistic is read as
    "larger = riskier", so a negative ρ predicts nothing useful). Also: the dense model's loss and
    accuracy, layer and example counts, KL, damage and gain totals; with ``svd_taylor_loss``, its
    total over the measured damage's (and over the curvature damage's).
    """
    table = risk_validation_table
    statistics = _statistics(table, risk_validation.statistics)
    outcomes = [outcome for outcome in OUTCOMES if outcome in table.columns]
    correlations = {
        outcome: {name: spearman(table[name], table[outcome]) for name in statistics}
        for outcome in outcomes
    }
    best = {}
    for outcome, by_statistic in correlations.items():
        ranked = [
            (value["rho"], name) for name, value in by_statistic.items() if value["rho"] is not None
        ]
        best[outcome] = max(ranked)[1] if ranked else None
    damage = table["svd_loss_increase"]
    summary: dict[str, Any] = {
        "weighted_solver": WEIGHTED_SOLVER,
        "layers": len(table),
        "examples": int(table["examples"].iloc[0]),
        "dense_loss": float(table["dense_loss"].iloc[0]),
        "dense_accuracy": _finite(table["dense_accuracy"].iloc[0]),
        "statistics": statistics,
        "correlations": correlations,
        "best_predictor": best,
        "svd_loss_increase_sum": float(damage.sum()),
        "svd_loss_increase_max": float(damage.max()),
        "svd_loss_increase_max_module": str(table.loc[damage.idxmax(), "module"]),
        f"{WEIGHTED_SOLVER}_loss_increase_sum": float(
            table[f"{WEIGHTED_SOLVER}_loss_increase"].sum()
        ),
        "weighted_gain_sum": float(table["weighted_gain"].sum()),
        "weighted_gain_positive_layers": int((table["weighted_gain"] > 0).sum()),
        "seconds": float(table["seconds"].sum()),
    }
    for solver in ("svd", WEIGHTED_SOLVER):
        if f"{solver}_kl" in table.columns:
            summary[f"{solver}_kl_sum"] = float(table[f"{solver}_kl"].sum())
    if "svd_curvature_damage" in table.columns:
        summary["svd_curvature_damage_sum"] = float(table["svd_curvature_damage"].sum())
        summary["svd_first_order_abs_sum"] = float(table["svd_first_order"].abs().sum())
    if "svd_taylor_loss" in table.columns:
        for key, column in (
            ("svd_taylor_loss_sum_rel_measured", "svd_loss_increase"),
            ("svd_taylor_loss_sum_rel_curvature", "svd_curvature_damage"),
        ):
            if column in table.columns and table[column].sum() != 0:
                summary[key] = float(table["svd_taylor_loss"].sum() / table[column].sum())
    return with_fingerprint(summary, fingerprint_of(table))


def risk_validation_metrics(risk_validation_summary: dict[str, Any]) -> dict[str, dict]:
    """The summary as MLflow metrics (step 0): ``spearman_<kl|damage|gain|curvature>.<statistic>``,
    ``p_value_<kl|damage|gain|curvature>.<statistic>``, and the dense loss, KL, damage and gain
    totals.
    """
    metrics = {}
    for outcome, by_statistic in risk_validation_summary["correlations"].items():
        short = OUTCOMES[outcome]
        for name, value in by_statistic.items():
            if value["rho"] is not None:
                metrics[f"spearman_{short}.{name}"] = value["rho"]
                metrics[f"p_value_{short}.{name}"] = value["p_value"]
    for key in (
        "layers",
        "examples",
        "dense_loss",
        "dense_accuracy",
        "svd_kl_sum",
        f"{WEIGHTED_SOLVER}_kl_sum",
        "svd_loss_increase_sum",
        f"{WEIGHTED_SOLVER}_loss_increase_sum",
        "weighted_gain_sum",
        "svd_curvature_damage_sum",
        "svd_first_order_abs_sum",
        "svd_taylor_loss_sum_rel_measured",
        "svd_taylor_loss_sum_rel_curvature",
        "seconds",
    ):
        value = risk_validation_summary.get(key)
        if value is not None:
            metrics[key] = float(value)
    return {key: {"value": float(value), "step": 0} for key, value in metrics.items()}


def plot_risk_validation(
    risk_validation_table: pd.DataFrame, risk_validation_summary: dict[str, Any]
) -> Figure:
    """φ (log x) against SVD's KL, SVD's damage, the weighted gain (and the curvature damage when
    measured), points coloured by module kind, Spearman ρ in the titles; further panels do the
    same for the best predictor of each outcome when that is not φ.
    """
    table = risk_validation_table
    correlations = risk_validation_summary["correlations"]
    best = risk_validation_summary["best_predictor"]
    panels = [("phi", outcome) for outcome in correlations if "phi" in correlations[outcome]]
    panels += [
        (best[outcome], outcome)
        for outcome in correlations
        if best[outcome] is not None and best[outcome] != "phi"
    ]
    if not panels:
        raise ValueError("the summary has no correlation to plot (no statistic in layer_risk)")
    kinds = ordered_kinds(table["kind"])
    colours = {kind: f"C{index % 10}" for index, kind in enumerate(kinds)}
    rows = math.ceil(len(panels) / 2)
    figure = Figure(figsize=(11, 4.2 * rows))
    grid = figure.subplots(rows, 2, squeeze=False)
    labels = {
        "svd_kl": "SVD KL(p_dense ‖ p_compressed), nats",
        "svd_curvature_damage": "SVD curvature damage (even part)",
        "svd_loss_increase": "SVD damage (val. loss increase)",
        "weighted_gain": (f"weighted gain (SVD − {WEIGHTED_SOLVER} loss increase)"),
    }
    for axes, (statistic, outcome) in zip(grid.flat, panels, strict=False):
        for kind in kinds:
            rows_of_kind = table[table["kind"] == kind]
            axes.scatter(
                rows_of_kind[statistic],
                rows_of_kind[outcome],
                label=kind,
                color=colours[kind],
                s=28,
                alpha=0.85,
            )
        x = table[statistic].to_numpy(dtype=float)
        if np.all(x[np.isfinite(x)] > 0):
            axes.set_xscale("log")
        y = np.abs(table[outcome].to_numpy(dtype=float))
        nonzero = y[np.isfinite(y) & (y > 0)]
        if nonzero.size:
            axes.set_yscale("symlog", linthresh=float(np.median(nonzero)))
        axes.axhline(0.0, color="grey", linewidth=0.8)
        value = correlations[outcome][statistic]
        rho = "n/a" if value["rho"] is None else f"{value['rho']:.2f} (p = {value['p_value']:.2g})"
        prefix = "best predictor: " if statistic == best[outcome] else ""
        axes.set_title(
            f"{prefix}{statistic} vs {OUTCOMES[outcome]}: Spearman ρ = {rho}, n = {value['n']}",
            fontsize=9,
        )
        axes.set_xlabel(statistic + (" (log)" if axes.get_xscale() == "log" else ""))
        axes.set_ylabel(labels[outcome])
    for axes in list(grid.flat)[len(panels) :]:
        axes.set_visible(False)
    grid.flat[0].legend(fontsize=8, title="module kind", title_fontsize=8)
    figure.suptitle(
        f"Does the risk statistic predict SVD damage? {len(table)} layers, each compressed alone, "
        f"{int(table['examples'].iloc[0])} validation examples"
    )
    figure.tight_layout()
    return figure


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
