"""Lineage hooks: one lineage check per node (fine-tuned model and parameters), and saved versions
that cannot be used named with the ``--load-versions`` that avoids them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Node, Pipeline


class LineageCheck:
    """Refuses a node whose inputs were made from different fine-tuned models (naming both
    datasets' versions and the ``--load-versions`` of a matching pair on disk), or under other
    parameter values than the run's (naming the keys and the node that remakes it); stamps what a
    node returns with the parameters it read (:mod:`lineage`)."""

    @hook_impl
    def before_node_run(self, node: Node, catalog: Any, inputs: dict[str, Any]) -> None:
        data = {
            name: value
            for name, value in inputs.items()
            if not name.startswith("params:") and name != "parameters"
        }
        _check_fingerprints(node, catalog, data)
        _check_parameters(node, catalog, data)

    @hook_impl
    def after_node_run(self, node: Node, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        from weighted_lowrank.kedro_glue.lineage import parameters_read, with_parameters

        # Kedro's runners save the values of this dict after the hook: the stamped copies.
        stamp = parameters_read(node.name, node.func, inputs)
        for name, value in outputs.items():
            outputs[name] = with_parameters(value, stamp)


def _check_fingerprints(node: Node, catalog: Any, inputs: dict[str, Any]) -> None:
    # Imported here: lineage pulls in transformers, and settings.py loads this module always.
    from weighted_lowrank.kedro_glue.lineage import fingerprint_of, reference_fingerprint

    known = {
        name: found
        for name, value in inputs.items()
        if (found := fingerprint_of(value)) is not None
    }
    reference = reference_fingerprint(known)
    wrong = [name for name, value in known.items() if value != reference]
    if not wrong:
        return
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
        if (version := _newest(catalog, name, "fingerprint_at", reference)) is not None
    ]
    if fixes:
        lines.append(f"pin matching versions with --load-versions={','.join(fixes)}")
    else:
        lines.append(
            f"re-run the pipelines that make {sorted(wrong)} on the current model, or pin "
            "matching versions with --load-versions=<dataset>:<version>"
        )
    raise ValueError("\n".join(lines))


def _check_parameters(node: Node, catalog: Any, inputs: dict[str, Any]) -> None:
    from weighted_lowrank.kedro_glue.lineage import flatten, parameter_differences

    parameters = _dataset(catalog, "parameters")
    if parameters is None:  # in-memory test catalogs
        return
    current = {key[1:]: text for key, text in flatten("", parameters.load()).items()}
    for name, value in inputs.items():
        if (found := parameter_differences(value, current)) is None:
            continue
        producer, differing = found
        lines = [
            f"node {node.name!r}: its input {name}{_version_note(catalog, name)} was made by node "
            f"{producer!r} under other parameters than this run's:",
            *(
                f"  {key}: {made or 'unset'} when made, {now or 'unset'} now"
                for key, (made, now) in sorted(differing.items())
            ),
            f"remake it with kedro run --from-nodes={producer} (with this run's --params), or run "
            "with the values it was made under",
        ]
        raise ValueError("\n".join(lines))


class SavedVersionChecks:
    """Names the catalog entry, its version and the fix when a saved version cannot be used:
    before the runner loads an entry, the dataset checks the files of that version
    (``check_load_version``, told the entry's name, which Kedro does not tell a dataset); before
    a node that reads a compressed model and a rank map, their ranks must agree."""

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
        # Imported here: the core pulls in torch (settings.py imports this module).
        from weighted_lowrank.lowrank.layer import lowrank_ranks

        model, rank_map = models[0], rank_maps[0]
        found, expected = lowrank_ranks(inputs[model].model), _map_ranks(inputs[rank_map])
        if found != expected:
            raise ValueError(_rank_map_mismatch(node, catalog, model, rank_map, found, expected))


def _map_ranks(rank_map: Any) -> dict[str, int]:
    """``{module: rank}`` of a rank map's factorized layers (its rows not kept dense)."""
    return {str(row.module): int(row.rank) for row in rank_map.itertuples() if not bool(row.dense)}


def _rank_map_mismatch(
    node: Node, catalog: Any, model: str, rank_map: str, found: dict, expected: dict
) -> str:
    differing = sorted(key for key in {*found, *expected} if found.get(key) != expected.get(key))
    lines = [
        f"node {node.name!r}: the compressed model {model}{_version_note(catalog, model)} and "
        f"the rank map {rank_map}{_version_note(catalog, rank_map)} are not one pair — they "
        f"disagree at {len(differing)} layers, e.g. {differing[0]!r}: rank "
        f"{found.get(differing[0])} in the model, {expected.get(differing[0])} in the rank map"
    ]

    def load(version: str) -> dict[str, int]:
        return _map_ranks(catalog.load(rank_map, version=version))

    fixes = []
    if (version := _newest(catalog, rank_map, load, found)) is not None:
        fixes.append(f"--load-versions={rank_map}:{version} (the rank map of this model)")
    if (version := _newest(catalog, model, "lowrank_ranks_at", expected)) is not None:
        fixes.append(f"--load-versions={model}:{version} (the model of this rank map)")
    if fixes:
        lines.append("pin a matching pair with " + ", or ".join(fixes))
    else:
        lines.append(
            f"no saved version of either matches the other: re-run the factorization that "
            f"makes them (e.g. kedro run --to-outputs={model},{rank_map})"
        )
    return "\n".join(lines)


def _newest(catalog: Any, name: str, read: str | Callable[[str], Any], wanted: Any) -> str | None:
    """The newest saved version ``v`` of ``name`` with ``read(v) == wanted``; a str ``read`` names
    a method of the dataset (no match when it has none). An unreadable version matches nothing."""
    dataset = _dataset(catalog, name)
    read = getattr(dataset, read, None) if isinstance(read, str) else read
    try:
        versions = dataset.list_versions(full_path=False) if read is not None else []
    except Exception:  # noqa: BLE001 - not versioned, no version yet, or no such entry
        versions = []
    for version in versions:
        try:
            if read(version) == wanted:
                return version
        except Exception:  # noqa: BLE001 - an unreadable version matches nothing
            continue
    return None


def _dataset(catalog: Any, name: str) -> Any:
    try:
        return catalog.get(name)
    except Exception:  # a catalog without the entry (in-memory test catalogs)
        return None


def _version_note(catalog: Any, name: str) -> str:
    try:
        version = _dataset(catalog, name).resolve_load_version()
    except Exception:  # not versioned (no such method), or nothing saved yet
        return ""
    return "" if version is None else f" (version {version})"
