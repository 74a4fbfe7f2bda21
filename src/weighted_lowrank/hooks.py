"""Project hooks: every parameter checked before any node runs, one lineage check per node, and
saved versions that cannot be used named with the ``--load-versions`` that avoids them."""

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
        _check_targets_fit_model(pipeline, typed)


#: Nodes (the last part of a namespaced name) that select the targeted layers, or train a model
#: that later ones compress: a ``targets`` setting that fits no layer fails before them.
_TARGET_NODES = frozenset(
    {
        "initialise_model",
        "fine_tune",
        "estimate_fisher",
        "compute_layer_risk",
        "measure_layer_damage",
        "svd_reference",
        "loss_curves",
        "allocate",
        "compress",
        "evaluate",
        "refine",
    }
)
#: ``(source, task, config.json mtime) → model structure`` of this process (meta device).
_STRUCTURES: dict[tuple[str, str, float | None], Any] = {}


def _check_targets_fit_model(pipeline: Pipeline | None, typed: dict[str, Any]) -> None:
    """When the run has a node that selects targets (or fine-tunes), ``compression.targets``
    (and ``fisher_estimation.targets`` when the Fisher is estimated) must select Linear modules
    of ``model.source``'s architecture: resolved on its structure (``hf.model_structure``: the
    config and the module tree on the meta device, no weight read), so a regex that matches
    nothing, a named module that does not exist, or ``null`` on an architecture whose blocks
    cannot be found fails now, with the model's projections (names, shapes) listed.

    A model source whose config cannot be read here (a hub name offline and not cached, a
    directory not made yet, an architecture transformers cannot build) skips the check with a
    warning: the node that loads the model reports that, and the nodes that select targets
    still check them on the loaded model.
    """
    if pipeline is None:
        return
    node_names = {node.name.rpartition(".")[2] for node in pipeline.nodes}
    if not node_names & _TARGET_NODES:
        return
    model = typed["params:model"]
    try:
        structure = _model_structure(model)
    except Exception as exc:  # noqa: BLE001 - any unreadable source: skipped, see docstring
        import logging

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


def _model_structure(model: Any) -> Any:
    from pathlib import Path

    from weighted_lowrank.hf import model_structure, resolve_model_source

    resolved = resolve_model_source(model.source)
    config = Path(resolved) / "config.json"
    key = (resolved, model.task, config.stat().st_mtime if config.is_file() else None)
    if key not in _STRUCTURES:
        _STRUCTURES.clear()  # one model per process in practice; keep no stale trees
        _STRUCTURES[key] = model_structure(model.source, model.resolved_task())
    return _STRUCTURES[key]


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


class SavedVersionChecks:
    """Names the catalog entry, its version and the fix when a saved version cannot be used.

    * Before the runner loads an entry, the project datasets check the files of the version they
      would load (``check_load_version``: sizes and headers, no tensor read) — a truncated
      ``model.safetensors``, a missing ``config.json``, a damaged tensor file fail here naming
      the entry, the version directory and ``--load-versions=<entry>:<previous complete
      version>``. Kedro does not tell a dataset its catalog name (``DataCatalog.load`` only
      prefixes it to the error), hence this hook; it keeps the catalog it is given at the start
      of the run.
    * Before a node that reads a compressed model and a rank map (``evaluate``), their ranks must
      agree; the error names both entries with their versions and the ``--load-versions`` of a
      saved version of either that matches the other.
    """

    def __init__(self) -> None:
        self._catalog: Any = None

    @hook_impl
    def before_pipeline_run(
        self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any
    ) -> None:
        self._catalog = catalog

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._catalog = None  # the catalog holds the run's in-memory data

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._catalog = None

    @hook_impl
    def before_dataset_loaded(self, dataset_name: str, node: Node) -> None:
        check = getattr(_dataset(self._catalog, dataset_name), "check_load_version", None)
        if check is not None:
            check(entry=dataset_name)

    @hook_impl
    def before_node_run(self, node: Node, catalog: Any, inputs: dict[str, Any]) -> None:
        models = [name for name in inputs if name.rpartition(".")[2] == "compressed_model"]
        rank_maps = [name for name in inputs if name.rpartition(".")[2] == "rank_map"]
        if len(models) != 1 or len(rank_maps) != 1:
            return
        # Imported here: the evaluation nodes pull in torch (settings.py imports this module).
        from weighted_lowrank.pipelines.evaluation.nodes import check_rank_map

        model, rank_map = models[0], rank_maps[0]
        try:
            check_rank_map(inputs[model].model, inputs[rank_map])
        except ValueError as error:
            raise ValueError(
                _rank_map_mismatch(node, catalog, inputs, model, rank_map, error)
            ) from None


def _rank_map_mismatch(
    node: Node, catalog: Any, inputs: dict[str, Any], model: str, rank_map: str, error: Exception
) -> str:
    from weighted_lowrank.lowrank.layer import lowrank_ranks
    from weighted_lowrank.pipelines.evaluation.nodes import rank_map_ranks

    lines = [
        f"node {node.name!r}: the compressed model {model}{_version_note(catalog, model)} and "
        f"the rank map {rank_map}{_version_note(catalog, rank_map)} are not one pair — {error}"
    ]
    fixes = []
    map_version = _rank_map_version(catalog, rank_map, lowrank_ranks(inputs[model].model))
    if map_version is not None:
        fixes.append(f"--load-versions={rank_map}:{map_version} (the rank map of this model)")
    model_version = _model_version(catalog, model, rank_map_ranks(inputs[rank_map]))
    if model_version is not None:
        fixes.append(f"--load-versions={model}:{model_version} (the model of this rank map)")
    if fixes:
        lines.append("pin a matching pair with " + ", or ".join(fixes))
    else:
        lines.append(
            f"no saved version of either matches the other: re-run the factorization that "
            f"makes them (e.g. kedro run --to-outputs={model},{rank_map})"
        )
    return "\n".join(lines)


def _rank_map_version(catalog: Any, name: str, ranks: dict[str, int]) -> str | None:
    """The newest saved version of the rank map ``name`` whose factorized layers are ``ranks``."""
    from weighted_lowrank.pipelines.evaluation.nodes import rank_map_ranks

    for version in _versions(catalog, name):
        try:
            if rank_map_ranks(catalog.load(name, version=version)) == ranks:
                return version
        except Exception:  # an unreadable version matches nothing
            continue
    return None


def _model_version(catalog: Any, name: str, ranks: dict[str, int]) -> str | None:
    """The newest saved version of the compressed model ``name`` whose low-rank layers are
    ``ranks`` and whose files are complete."""
    dataset = _dataset(catalog, name)
    if not hasattr(dataset, "lowrank_ranks_at"):
        return None
    for version in _versions(catalog, name):
        if dataset.lowrank_ranks_at(version) == ranks:
            return version
    return None


def _versions(catalog: Any, name: str) -> list[str]:
    """The saved versions of ``name``, newest first ([] when it is not versioned)."""
    dataset = _dataset(catalog, name)
    if not getattr(dataset, "_version", None):
        return []
    try:
        return dataset.list_versions(full_path=False)
    except Exception:
        return []


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
