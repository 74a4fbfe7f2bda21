"""Project hooks: every parameter checked before any node runs, and one lineage check per node."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Node, Pipeline

from weighted_lowrank.parameters import ParameterError, parse_parameters


class ParameterChecks:
    """Parses every parameter block once, at the start of a run, before any node runs.

    Kedro already builds the typed blocks a node's signature names (:mod:`weighted_lowrank.
    parameters`) for the pipelines being run; this also checks the solver option blocks, which
    nodes receive as plain dicts, and the blocks of every other pipeline, so a bad value anywhere
    in conf/ is reported now and not at the node that reads it.
    """

    @hook_impl
    def before_pipeline_run(
        self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any
    ) -> None:
        typed = parse_parameters(catalog.load("parameters"))
        _check_statistics_cover_solvers(pipeline, typed)


def _check_statistics_cover_solvers(pipeline: Pipeline | None, typed: dict[str, Any]) -> None:
    """When this run estimates the calibration statistics, they must include every statistic a
    solver compressed in the same run needs (for its factors or its loss curve), and A and G
    when the risk signal is the Kronecker prediction — else that node would fail after the
    Fisher pass."""
    from weighted_lowrank.lowrank.risk import KRONECKER_NEEDS, KRONECKER_STATISTICS
    from weighted_lowrank.lowrank.solvers import SOLVERS, curve_needs, solver_needs

    node_names = {node.name for node in pipeline.nodes} if pipeline is not None else set()
    if "estimate_fisher" not in node_names:
        return
    configured = set(typed["params:fisher_estimation"].statistics)
    lacking = {}
    curve_loss_model = typed["params:compression"].curve_loss_model
    for solver in SOLVERS:
        options = typed[f"params:{solver}.options"]
        needs = set()
        if f"{solver}.compress" in node_names:
            needs.update(solver_needs(solver, **options))
        if f"{solver}.loss_curves" in node_names:
            needs.update(curve_needs(solver, curve_loss_model, **options))
        missing = sorted(need for need in needs if need not in configured)
        if missing:
            lacking[solver] = missing
    risk = typed["params:svd_risk"]
    if "compute_layer_risk" in node_names and risk.statistic in KRONECKER_STATISTICS:
        missing = [need for need in KRONECKER_NEEDS if need not in configured]
        if missing:
            lacking[f"svd_risk.statistic={risk.statistic}"] = missing
    if lacking:
        raise ParameterError(
            f"fisher_estimation.statistics={sorted(configured)} lacks what the nodes of this run "
            f"need: {lacking}; add them to fisher_estimation.statistics "
            "(conf/base/parameters_fisher_estimation.yml)"
        )


class LineageCheck:
    """Refuses to run a node whose inputs were made from different fine-tuned models.

    Every dataset derived from a fine-tuned model carries its fingerprint (:mod:`lineage`); a
    mix-up happens when one input is re-made (a new fine-tune) and another is loaded from an
    older version. The error names both datasets with their versions and the ``--load-versions``
    that pins a matching pair, when one exists on disk.
    """

    @hook_impl
    def before_node_run(self, node: Node, catalog: Any, inputs: dict[str, Any]) -> None:
        # Imported here: settings.py loads this module for every kedro command, and lineage
        # pulls in transformers (seconds).
        from weighted_lowrank.lineage import disagreements, fingerprint_of, reference_fingerprint

        fingerprints = {
            name: fingerprint_of(value)
            for name, value in inputs.items()
            if not name.startswith("params:") and name != "parameters"
        }
        wrong = disagreements(fingerprints)
        if not wrong:
            return
        known = {name: value for name, value in fingerprints.items() if value is not None}
        reference = reference_fingerprint(known)
        agreeing = [name for name, value in known.items() if value == reference]
        lines = [
            f"node {node.name!r} has inputs made from different fine-tuned models:",
            *(
                f"  {name}{_version_note(catalog, name)} comes from model {known[name]}"
                for name in [*agreeing, *wrong]
            ),
        ]
        fixes = [
            f"{name}:{version}"
            for name in wrong
            if (version := _matching_version(catalog, name, reference)) is not None
        ]
        if fixes:
            lines.append(f"pin matching versions with --load-versions={','.join(fixes)}")
        else:
            lines.append(
                f"re-run the pipelines that make {sorted(wrong)} on the current model, or pin "
                "matching versions with --load-versions=<dataset>:<version>"
            )
        raise ValueError("\n".join(lines))


def _dataset(catalog: Any, name: str) -> Any:
    try:
        return catalog.get(name)
    except Exception:  # a catalog without the entry (in-memory test catalogs)
        return None


def _version_note(catalog: Any, name: str) -> str:
    dataset = _dataset(catalog, name)
    resolve = getattr(dataset, "resolve_load_version", None)
    if resolve is None or not getattr(dataset, "_version", None):
        return ""
    try:
        return f" (version {resolve()})"
    except Exception:
        return ""


def _matching_version(catalog: Any, name: str, fingerprint: str) -> str | None:
    """The newest saved version of ``name`` made from ``fingerprint``, if the dataset can tell."""
    dataset = _dataset(catalog, name)
    if not hasattr(dataset, "fingerprint_at") or not getattr(dataset, "_version", None):
        return None
    # Kedro lists the versions of a dataset newest first.
    for path in dataset._get_versions():
        version = PurePosixPath(path).parent.name
        if dataset.fingerprint_at(version) == fingerprint:
            return version
    return None
