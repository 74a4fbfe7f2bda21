"""Typed parameters: conf/base parses, bad values are named, and conf and code read the same keys."""

from __future__ import annotations

import ast
import copy
import pickle
from pathlib import Path

import pytest
from kedro.framework.project import configure_project
from kedro.pipeline import Node, Pipeline
from kedro.validation import ParameterValidationError, ParameterValidator, instantiate_model
from kedro_mlflow.framework.hooks import MlflowHook
from pydantic import ValidationError

from tests.conftest import PROJECT_ROOT, block_values, conf_parameters, typed_params
from weighted_lowrank.kedro_glue.parameter_checks import TypedParamsMlflowHook
from weighted_lowrank.kedro_glue.parameters import (
    BLOCKS,
    Block,
    CompressionParams,
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
        ("data", {"split": 5}, r"data\.split=5: expected a mapping with the keys \['train'"),
        ("evaluation", {"latency": {"repeats": 0}}, r"evaluation\.latency\.repeats=0"),
        ("evaluation", {"device": "tpu"}, r"evaluation\.device='tpu'"),
        ("svd_risk", {"statistic": "nonsense"}, r"svd_risk\.statistic='nonsense'"),
        ("fine_tuning", {"warmup_ratio": 1.0}, r"fine_tuning\.warmup_ratio=1\.0"),
        ("compression", {"budget": 1.5}, r"compression\.budget=1\.5: expected a number in"),
        ("compression", {"curve_loss_model": "x"}, r"curve_loss_model='x': expected one of"),
        ("model", {"task": "seq2seq"}, r"model\.task='seq2seq': expected one of \['auto'"),
    ],
)
def test_bad_values_name_the_key_and_the_expectation(block, overrides, message):
    with pytest.raises(ParameterError, match=message):
        BLOCKS[block].model_validate(block_values(block, **overrides))


def test_unknown_and_missing_keys_are_errors_with_the_replacement_named():
    with pytest.raises(ParameterError, match=r"unknown keys \['enabled'\].*--pipelines refined"):
        RefinementParams.model_validate(block_values("refinement", enabled=True))
    with pytest.raises(ParameterError, match=r"dask_address is now compression\.parallel"):
        CompressionParams.model_validate(block_values("compression", dask_address=None))
    with pytest.raises(ParameterError, match=r"thresholds\.phi"):
        SvdRiskParams.model_validate(block_values("svd_risk", phi_threshold=3.0))
    values = block_values("evaluation")
    del values["batch_size"]
    with pytest.raises(ParameterError, match=r"evaluation lacks keys \['batch_size'\]"):
        EvaluationParams.model_validate(values)


def test_unknown_solver_option_fails_before_any_node():
    parameters = {**conf_parameters(), "tfwsvd": {"options": {"max_iter": 3}}}
    with pytest.raises(ParameterError, match=r"tfwsvd\.options.*max_iter"):
        parse_parameters(parameters)
    parameters = {**conf_parameters(), "tfwsvd": {"option": {}}}
    with pytest.raises(ParameterError, match=r"parameters tfwsvd has unknown keys \['option'\]"):
        parse_parameters(parameters)
    with pytest.raises(ParameterError, match=r"lack the solver blocks \['tfwsvd'\]"):
        parse_parameters({k: v for k, v in conf_parameters().items() if k != "tfwsvd"})


@pytest.mark.parametrize("value", ["serial", "threads", "threads:4", "tcp://10.0.0.5:8786"])
def test_parallel_accepts_its_documented_forms(value):
    assert typed_params("compression", parallel=value).parallel == value


@pytest.mark.parametrize("value", ["dask", "threads:0", "threads:x", "tcp:/host", None, 4])
def test_parallel_names_the_key_and_the_accepted_forms(value):
    message = r"compression\.parallel=.*: expected one of the forms .*'serial', 'threads'"
    with pytest.raises(ParameterError, match=message):
        typed_params("compression", parallel=value)


def _compress(compression: CompressionParams) -> float:
    return compression.budget


def test_kedro_builds_the_typed_blocks_and_reports_our_message():
    """Kedro instantiates the blocks nodes name with ``model_validate``: the same parse."""
    data = instantiate_model("data", block_values("data"), DataParams)
    assert data == DataParams.model_validate(block_values("data"))
    validator = ParameterValidator({"p": Pipeline([Node(_compress, "params:compression", "b")])})
    typed = validator.validate_raw_params(conf_parameters())
    assert typed["compression"] == typed_params("compression")
    bad = {**conf_parameters(), "compression": block_values("compression", budget=0.0)}
    with pytest.raises(ParameterValidationError, match=r"compression\.budget=0\.0: expected"):
        validator.validate_raw_params(bad)


def test_typed_blocks_are_frozen_and_survive_copies():
    data = DataParams.model_validate(block_values("data"))
    with pytest.raises(ValidationError, match="frozen"):
        data.source = "csv"  # type: ignore[misc]
    assert copy.deepcopy(data) == data and pickle.loads(pickle.dumps(data)) == data
    assert type(copy.deepcopy(data).split) is type(data.split)


def test_mlflow_logs_a_typed_block_one_param_per_key(monkeypatch):
    """kedro-mlflow flattens only dicts: the project's MLflow hook hands it each block dumped."""
    logged = {}
    monkeypatch.setattr(MlflowHook, "before_node_run", lambda self, **kw: logged.update(kw))
    inputs = {"params:evaluation": typed_params("evaluation"), "params:seed": 42}
    TypedParamsMlflowHook().before_node_run(node=None, catalog=None, inputs=inputs, is_async=False)
    assert logged["inputs"]["params:evaluation"]["latency"]["repeats"] == 20
    assert logged["inputs"]["params:seed"] == 42


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
    unread = set()
    for name, field in block.model_fields.items():
        if name not in read:
            unread.add(name)
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Block) and f"**{name}" not in read:
            unread |= _unread_fields(kind, read)
    return unread


def _attributes_read(path: Path, skip_validation: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if skip_validation:  # the blocks' own rules (model validators) do not count as reading
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                "model_validator" in ast.unparse(decorator) for decorator in node.decorator_list
            ):
                skipped |= {id(child) for child in ast.walk(node)}
    read = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and id(node) not in skipped
    }
    # `block.latency.model_dump()` hands every key of a nested block over, as does
    # `block.model_dump()` after `block = data.catalog if … else data.local_file`.
    assigned: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and node.value is not None:
                    assigned.setdefault(target.id, []).append(node.value)
    unpacked = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr != "model_dump":
                continue
            dumped = node.func.value
            sources = assigned.get(dumped.id, []) if isinstance(dumped, ast.Name) else [dumped]
            unpacked |= {
                f"**{part.attr}"
                for source in sources
                for part in ast.walk(source)
                if isinstance(part, ast.Attribute)
            }
    return read | unpacked


def test_every_key_of_every_block_is_read_somewhere():
    """A key in conf/base that no code reads is dead configuration (validation does not count)."""
    read: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        read |= _attributes_read(path, skip_validation=path.name == "parameters.py")
    unread = {name: sorted(_unread_fields(block, read)) for name, block in BLOCKS.items()}
    assert {name: keys for name, keys in unread.items() if keys} == {}
