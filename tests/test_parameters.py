"""Typed parameters: conf/base parses, bad values are named, and conf and code read the same keys."""

from __future__ import annotations

import ast
import copy
import dataclasses
import typing
from pathlib import Path

import pytest
from kedro.framework.project import configure_project

from tests.conftest import PROJECT_ROOT, block_values, conf_parameters
from weighted_lowrank.kedro_glue.parameters import (
    BLOCKS,
    Block,
    DataParams,
    EvaluationParams,
    ParameterError,
    RefinementParams,
    SvdRiskParams,
    parse_parameters,
)
from weighted_lowrank.pipeline_registry import register_pipelines

SOURCE = PROJECT_ROOT / "src" / "weighted_lowrank"


@pytest.mark.parametrize("env", ["base", "smoke"])
def test_every_environment_parses(env):
    typed = parse_parameters(conf_parameters(env))
    assert set(typed) >= {f"params:{block}" for block in BLOCKS}
    assert typed["params:data"].split.seed == typed["params:seed"]  # data.split.seed: ${seed}
    assert typed["params:compression"].seed == typed["params:seed"]


@pytest.mark.parametrize(
    ("block", "overrides", "message"),
    [
        ("data", {"split": {"train": 0}}, r"data\.split\.train=0: expected a count"),
        ("data", {"source": "excel"}, r"data\.source='excel': expected one of"),
        ("data", {"source": "csv"}, r"data\.local_file\.path to be set"),
        ("data", {"catalog": {"label_names": ["a"]}}, r"data\.catalog\.label_names"),
        ("evaluation", {"latency": {"repeats": 0}}, r"evaluation\.latency\.repeats=0"),
        ("evaluation", {"device": "tpu"}, r"evaluation\.device='tpu'"),
        ("svd_risk", {"statistic": "nonsense"}, r"svd_risk\.statistic='nonsense'"),
        ("fine_tuning", {"warmup_ratio": 1.0}, r"fine_tuning\.warmup_ratio=1\.0"),
        ("compression", {"budget": 1.5}, r"compression\.budget=1\.5: expected a number in"),
    ],
)
def test_bad_values_name_the_key_and_the_expectation(block, overrides, message):
    with pytest.raises(ParameterError, match=message):
        BLOCKS[block].parse(block_values(block, **overrides), block)


def test_unknown_and_missing_keys_are_errors_with_the_replacement_named():
    with pytest.raises(ParameterError, match=r"unknown keys \['enabled'\].*--pipelines refined"):
        RefinementParams.parse(block_values("refinement", enabled=True), "refinement")
    with pytest.raises(ParameterError, match=r"thresholds\.phi"):
        SvdRiskParams.parse(block_values("svd_risk", phi_threshold=3.0), "svd_risk")
    values = block_values("evaluation")
    del values["batch_size"]
    with pytest.raises(ParameterError, match=r"evaluation lacks keys \['batch_size'\]"):
        EvaluationParams.parse(values, "evaluation")


def test_unknown_solver_option_fails_before_any_node():
    parameters = {**conf_parameters(), "tfwsvd": {"options": {"max_iter": 3}}}
    with pytest.raises(ParameterError, match=r"tfwsvd\.options.*max_iter"):
        parse_parameters(parameters)


def test_typed_blocks_are_frozen_read_only_mappings_of_their_values():
    data = DataParams.parse(block_values("data"), "data")
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.source = "csv"  # type: ignore[misc]
    with pytest.raises(TypeError, match="read-only"):
        data["source"] = "csv"
    assert data["split"]["train"] == data.split.train  # kedro-mlflow flattens it like a dict
    assert DataParams(**block_values("data")) == data  # Kedro's own instantiation is the parse
    assert copy.deepcopy(data) == data and type(copy.deepcopy(data).split) is type(data.split)


# ----------------------------------------------------------------------------- conf ↔ code


def _node_parameter_inputs() -> set[str]:
    configure_project("weighted_lowrank")
    names: set[str] = set()
    for pipeline in register_pipelines().values():
        for node in pipeline.nodes:
            names.update(
                name[len("params:") :] for name in node.inputs if name.startswith("params:")
            )
    return names


def _has_path(values: dict, dotted: str) -> bool:
    for key in dotted.split("."):
        if not isinstance(values, dict) or key not in values:
            return False
        values = values[key]
    return True


def test_every_parameter_a_node_reads_is_in_conf_base():
    parameters = conf_parameters()
    missing = sorted(name for name in _node_parameter_inputs() if not _has_path(parameters, name))
    assert missing == []


def test_every_top_level_block_of_conf_base_is_read_by_a_node():
    used = {name.split(".")[0] for name in _node_parameter_inputs()}
    unread = sorted(set(conf_parameters()) - used)
    assert unread == []


def _unread_fields(block: type[Block], read: set[str]) -> set[str]:
    """Field names of a block (nested blocks included) that no code reads."""
    hints = typing.get_type_hints(block)
    unread = set()
    for item in dataclasses.fields(block):
        kind = hints[item.name]
        if item.name not in read:
            unread.add(item.name)
        if isinstance(kind, type) and issubclass(kind, Block) and f"**{item.name}" not in read:
            unread |= _unread_fields(kind, read)
    return unread


def _attributes_read(path: Path, skip_validation: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if skip_validation:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "_validate":
                skipped |= {id(child) for child in ast.walk(node)}
    read = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and id(node) not in skipped
    }
    # `**block.latency` hands every key of a nested block over (blocks are mappings).
    unpacked = {
        f"**{node.value.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword)
        and node.arg is None
        and isinstance(node.value, ast.Attribute)
    }
    return read | unpacked


def test_every_key_of_every_block_is_read_somewhere():
    """A key in conf/base that no code reads is dead configuration (validation does not count)."""
    read: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        read |= _attributes_read(path, skip_validation=path.name == "parameters.py")
    unread = {name: sorted(_unread_fields(block, read)) for name, block in BLOCKS.items()}
    assert {name: keys for name, keys in unread.items() if keys} == {}
