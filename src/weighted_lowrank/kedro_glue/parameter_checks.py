"""The hooks for parameters: every block checked before any node runs (each block parsed, the
statistics the chosen solvers need, the targets against the model's own structure), and
kedro-mlflow logging each typed block key by key."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Node, Pipeline
from kedro_mlflow.framework.hooks import MlflowHook
from pydantic import BaseModel

from weighted_lowrank.kedro_glue.parameters import ParameterError, parse_parameters


class ParameterChecks:
    """Parses every block at the start of a run: Kedro builds only the typed blocks of the nodes
    being run, not the solver options (plain dicts) nor the blocks of other pipelines."""

    @hook_impl
    def before_pipeline_run(
        self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any
    ) -> None:
        typed = parse_parameters(catalog.load("parameters"))
        _check_statistics_cover_solvers(pipeline, typed)
        _check_targets_fit_model(pipeline, typed)


class TypedParamsMlflowHook(MlflowHook):
    """kedro-mlflow's hook, registered in its place (``settings.DISABLE_HOOKS_FOR_PLUGINS``): it
    flattens only dicts, so a typed block is handed over dumped and logs one param per key."""

    @hook_impl
    def before_node_run(
        self, node: Node, catalog: Any, inputs: dict[str, Any], is_async: bool
    ) -> None:
        plain = {
            name: value.model_dump() if isinstance(value, BaseModel) else value
            for name, value in inputs.items()
        }
        super().before_node_run(node=node, catalog=catalog, inputs=plain, is_async=is_async)


#: Nodes (the last part of a namespaced name) that select the targeted layers, or train a model
#: that later ones compress: a ``targets`` setting that fits no layer fails before them.
_TARGET_NODES = frozenset(
    "initialise_model fine_tune estimate_fisher compute_layer_risk measure_dense_reference "
    "measure_damage svd_reference loss_curves allocate compress evaluate refine".split()
)


def _check_targets_fit_model(pipeline: Pipeline | None, typed: dict[str, Any]) -> None:
    """``compression.targets`` (and ``fisher_estimation.targets`` when the Fisher is estimated)
    must select Linear modules of ``model.source``'s structure (on the meta device, no weight
    read). A source unreadable here (offline hub name, a directory not made yet) is skipped with
    a warning: the nodes that load the model check the targets on it."""
    if pipeline is None:
        return
    node_names = {node.name.rpartition(".")[2] for node in pipeline.nodes}
    if not node_names & _TARGET_NODES:
        return
    model = typed["params:model"]
    try:
        structure = _model_structure(model.source, model.task)
    except Exception as exc:  # noqa: BLE001 - any unreadable source: skipped, see docstring
        logging.getLogger(__name__).warning(
            "compression.targets not checked before the run: model.source=%r cannot be read "
            "here (%s: %s)",
            model.source,
            type(exc).__name__,
            exc,
        )
        return
    checks = {"compression.targets": typed["params:compression"].targets}
    if "estimate_fisher" in node_names:
        checks["fisher_estimation.targets"] = typed["params:fisher_estimation"].targets
    for key, targets in checks.items():
        _check_targets(structure, key, targets, model.source)


def _model_structure(source: str, task: str) -> Any:
    from weighted_lowrank.hf.models import resolve_model_source

    config = Path(resolve_model_source(source)) / "config.json"
    return _structure(source, task, config.stat().st_mtime if config.is_file() else None)


@functools.lru_cache(maxsize=1)  # one model per process in practice; a changed config re-reads
def _structure(source: str, task: str, config_mtime: float | None) -> Any:
    from weighted_lowrank.hf.models import model_structure, resolve_task

    return model_structure(source, resolve_task(source, task))


def _check_targets(structure: Any, key: str, targets: Any, source: str) -> None:
    from weighted_lowrank.lowrank.architectures import architecture_name, describe_projections
    from weighted_lowrank.lowrank.targets import select_linear_modules

    try:
        select_linear_modules(structure, targets)
    except ValueError as exc:
        shown = list(targets) if isinstance(targets, tuple) else targets
        if targets is None:  # the error lists the model's Linear modules itself
            advice = f"Name the layers to compress in {key}: a regex or a list of module names"
        else:
            advice = (
                f"The model's attention and MLP projections: {describe_projections(structure)}. "
                f"Set {key} to null (those projections), a regex or a list of module names"
            )
        raise ParameterError(
            f"{key}={shown!r} does not fit model.source={source!r} "
            f"({architecture_name(structure)}): {exc}. {advice} (conf/base/parameters.yml)"
        ) from None


def _check_statistics_cover_solvers(pipeline: Pipeline | None, typed: dict[str, Any]) -> None:
    """A run that estimates the calibration statistics must estimate what its solvers (factors,
    loss curves) and a Kronecker risk signal need, else they would fail after the Fisher pass."""
    from weighted_lowrank.lowrank.risk import KRONECKER_NEEDS, KRONECKER_STATISTICS
    from weighted_lowrank.lowrank.solvers import SOLVERS, curve_needs, solver_needs

    node_names = {node.name for node in pipeline.nodes} if pipeline is not None else set()
    if "estimate_fisher" not in node_names:
        return
    configured = set(typed["params:fisher_estimation"].statistics)
    curve_loss_model = typed["params:compression"].curve_loss_model
    needs: dict[str, set[str]] = {}
    for solver in SOLVERS:
        options = typed[f"params:{solver}.options"]
        needs[solver] = set()
        if f"{solver}.compress" in node_names:
            needs[solver].update(solver_needs(solver, **options))
        if f"{solver}.loss_curves" in node_names:
            needs[solver].update(curve_needs(solver, curve_loss_model, **options))
    risk = typed["params:svd_risk"]
    if "compute_layer_risk" in node_names and risk.statistic in KRONECKER_STATISTICS:
        needs[f"svd_risk.statistic={risk.statistic}"] = set(KRONECKER_NEEDS)
    lacking = {who: sorted(need - configured) for who, need in needs.items() if need - configured}
    if lacking:
        raise ParameterError(
            f"fisher_estimation.statistics={sorted(configured)} lacks what the nodes of this run "
            f"need: {lacking}; add them to fisher_estimation.statistics "
            "(conf/base/parameters_fisher_estimation.yml)"
        )
