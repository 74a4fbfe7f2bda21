"""Typed Kedro parameters: one Pydantic model per block (every key set in ``conf/``, none unknown),
parsed once per run (:func:`parse_parameters`), errors naming key, value and expectation. No torch
at import (``settings.py`` loads this module for every ``kedro`` command): values the numerical
core owns are checked against it when a block is parsed.
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    model_validator,
)

#: Keys that used to exist, with what replaced them (shown when someone still sets one).
RENAMED = {
    "refinement.enabled": "refinement runs when its pipeline does: `kedro run --pipelines "
    "refined` (the whole run with refinement) or `kedro run --pipelines refinement` after a run",
    "svd_risk.phi_threshold": "phi_threshold is now thresholds.phi (with statistic: phi)",
    "risk_validation.solvers": "the solvers are fixed when the pipeline is built (SOLVERS in "
    "pipelines/risk_validation/pipeline.py)",
    "compression.dask_address": "dask_address is now compression.parallel (e.g. parallel: "
    "tcp://host:8786)",
}


class ParameterError(ValueError):
    """A parameter has a value the run cannot use; the message names key, value and expectation."""


class Expected(ValueError):
    """Raised by a rule across fields: ``what`` the value of ``key`` should have been."""

    def __init__(self, what: str, key: str | None = None) -> None:
        super().__init__(what)
        self.key = key


class Block(BaseModel):
    """A parameter block: its fields are exactly the block's YAML keys, none with a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @classmethod
    def model_validate(cls, obj: Any, *, path: str | None = None, **kwargs: Any) -> Any:
        """Pydantic's parse (Kedro's, for a typed node input); a ParameterError names every bad
        key under ``path`` (default: the block's key in :data:`BLOCKS`)."""
        if path is None:
            path = next((name for name, block in BLOCKS.items() if block is cls), "")
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as error:
            raise ParameterError(describe(error, cls, obj, path)) from None


def describe(error: ValidationError, block: type[BaseModel], values: Any, path: str) -> str:
    """One line per problem of ``error``: the dotted key, its value and what was expected."""
    lines = []
    for item in error.errors():
        loc, cause = list(item["loc"]), (item.get("ctx") or {}).get("error")
        if getattr(cause, "key", None):  # a rule across fields that names its key
            loc.append(cause.key)
        holder, depth, field = _locate(block, loc)
        where = _dotted(path, loc[:-1])
        if item["type"] == "missing":
            lines.append(
                f"parameters {where} lacks keys {loc[-1:]}; every key of a block is set in "
                "conf/base (defaults live there)"
            )
        elif item["type"] == "extra_forbidden":
            hint = RENAMED.get(f"{where}.{loc[-1]}")
            lines.append(
                f"parameters {where} has unknown keys {loc[-1:]}; expected "
                f"{[*holder.model_fields]}" + (f"; {hint}" if hint else "")
            )
        elif field is None and cause is not None:  # a rule over a whole block
            lines.append(f"parameters {_dotted(path, loc)}: expected {cause}")
        else:
            key = loc[: depth + 1] if field is not None else loc
            value = values
            for part in key:
                value = value[part] if isinstance(value, Mapping) else getattr(value, part)
            what = cause or (
                _expected(field.annotation, field.metadata) if field else _expected(holder, [])
            )
            lines.append(
                f"parameter {_dotted(path, key)}={value!r}: expected {what or item['msg']}"
            )
    return "\n".join(dict.fromkeys(lines))  # an error per list item would repeat its line


def _dotted(path: str, loc: list[Any]) -> str:
    return ".".join(str(part) for part in [path, *loc] if part != "") or "(top level)"


def _locate(block: type[BaseModel], loc: list[Any]) -> tuple[type[BaseModel], int, Any]:
    """The block that holds ``loc``'s field, the field's index in ``loc`` and its FieldInfo
    (None when ``loc`` ends at a block or at a key the block lacks)."""
    for depth, part in enumerate(loc):
        field = block.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not _is_block(field.annotation):
            return block, depth, field
        block = field.annotation
    return block, len(loc), None


def _is_block(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _expected(kind: Any, metadata: list[Any]) -> str | None:
    """What a value of the annotation ``kind`` (with constraints ``metadata``) looks like."""
    if get_origin(kind) is Annotated:
        kind, *extra = get_args(kind)
        metadata = [*metadata, *extra]
    if get_origin(kind) in (Union, types.UnionType):
        inner = [_expected(arg, metadata) for arg in get_args(kind) if arg is not type(None)]
        return None if None in inner else " or ".join([*inner, "null"])  # type: ignore[list-item]
    if get_origin(kind) is Literal:
        return f"one of {list(get_args(kind))}"
    if _is_block(kind):
        return f"a mapping with the keys {[*kind.model_fields]}"
    bounds = {
        bound: getattr(item, bound)
        for item in metadata
        for bound in ("gt", "ge", "lt", "le")
        if hasattr(item, bound)
    }
    if kind is int:
        low = bounds.get("ge")
        return "a positive int" if low == 1 else "an int" + ("" if low is None else f" >= {low}")
    if kind is float:
        low = bounds.get("gt", bounds.get("ge", -math.inf))
        high = bounds.get("lt", bounds.get("le", math.inf))
        left, right = "[" if "ge" in bounds else "(", "]" if "le" in bounds else ")"
        return f"a number in {left}{low:g}, {high:g}{right}"
    kinds = {bool: "true or false", str: "a string", list: "a list", dict: "a mapping"}
    if any(isinstance(item, MinLen) for item in metadata):
        kinds |= {str: "a non-empty string", list: "a non-empty list of strings"}
    return kinds.get(get_origin(kind) or kind)


PositiveInt = Annotated[int, Ge(1)]
Text = Annotated[str, MinLen(1)]
Texts = Annotated[list[Text], MinLen(1)]


def _owned(dotted: str) -> Any:
    """``weighted_lowrank.<dotted>``: a value the numerical core owns, imported when a block is
    parsed (not when this module is)."""
    module, _, name = f"weighted_lowrank.{dotted}".rpartition(".")
    return getattr(importlib.import_module(module), name)


def owned_choice(dotted: str) -> AfterValidator:
    """A value of the core's tuple ``dotted`` (e.g. ``hf.models.MODEL_TASKS``)."""

    def check_choice(value: Any) -> Any:
        if value not in _owned(dotted):
            raise ValueError(f"one of {list(_owned(dotted))}")
        return value

    return AfterValidator(check_choice)


def owned_check(dotted: str, expected: str, before: bool = False) -> Any:
    """A check that the core's function ``dotted`` accepts the value (``before`` pydantic's type
    check, so that its message also covers a value of another type)."""

    def check(value: Any) -> Any:
        try:
            _owned(dotted)(value)
        except ValueError as error:
            raise ValueError(f"{expected} ({error})") from None
        return value

    return (BeforeValidator if before else AfterValidator)(check)


def check_targets(value: Any) -> str | tuple[str, ...] | None:
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError("null, a regex over module names or a list of module names")


def check_codec(value: str) -> str:
    """``auto`` or a text codec Python knows: utf-8, latin-1, cp1252, utf-16, … (not base64)."""
    try:
        if value != "auto":
            "".encode(value)  # looks the codec up, and refuses bytes-to-bytes ones
    except LookupError:
        raise ValueError("auto or a Python text codec name (utf-8, latin-1, cp1252, …)") from None
    return value


def check_split_size(value: Any) -> int | float:
    if (type(value) is int and value >= 1) or (type(value) is float and 0.0 < value <= 1.0):
        return value
    raise ValueError("a count >= 1 or a fraction in (0, 1]")


def check_statistics(value: Any) -> tuple[str, ...]:
    """A list of calibration statistic names, each known and listed once (empty: none)."""
    from weighted_lowrank.lowrank.calibration import CALIBRATION_STATISTICS, check_statistics

    expected = f"a list of names from {list(CALIBRATION_STATISTICS)}, each at most once ([]: none)"
    if not isinstance(value, list | tuple):
        raise ValueError(expected)
    try:
        return check_statistics(value)
    except ValueError as error:
        raise ValueError(f"{expected}; {error}") from None


#: ``auto``, ``cpu`` or ``cuda[:N]``; CUDA without a GPU fails at the start of a run.
Device = Annotated[
    str, owned_check("lowrank.devices.resolve_device", "auto, cpu or an available cuda")
]
Targets = Annotated[str | tuple[str, ...] | None, BeforeValidator(check_targets)]


class ModelParams(Block):
    """``model``: the checkpoint fine-tuned and compressed, its task and tokenization length."""

    source: Text
    task: Annotated[Text, owned_choice("hf.models.MODEL_TASKS")]
    max_length: Annotated[int, Ge(2)]

    def resolved_task(self) -> str:
        """``task``, or for ``auto`` the one the checkpoint's ``config.json`` declares."""
        from weighted_lowrank.hf.models import resolve_task

        return resolve_task(self.source, self.task)


#: How ``compression.budget`` is spread over the targeted layers (lowrank/allocation.py).
Allocation = Literal["uniform", "global"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)


class CompressionParams(Block):
    """``compression``: what every solver shares (budget, allocation, targets, seed, device, …)."""

    budget: Annotated[float, Gt(0), Lt(1)]
    allocation: Allocation
    curve_loss_model: Annotated[Text, owned_choice("lowrank.solvers.CURVE_LOSS_MODELS")]
    targets: Targets
    seed: int
    device: Device
    parallel: Annotated[
        str, owned_check("lowrank.parallel.parse_parallel", "one of the forms", True)
    ]


class SolverParams(Block):
    """``<solver>``: the solver's own options (names and defaults: ``solver_options(name)``)."""

    options: dict[str, Any]


class LabelledColumns(Block):
    """Where the text, optional text pair and label live in a table, and which labels count."""

    text_column: Text
    text_pair_column: Text | None
    label_column: Text
    label_values: list[Any] | None
    label_names: list[Any] | None
    task_type: Literal["classification", "regression"]
    unescape_html: bool

    @model_validator(mode="after")
    def _labels(self) -> LabelledColumns:
        values, names = self.label_values, self.label_names
        if self.task_type == "regression" and (values is not None or names is not None):
            raise Expected("no label_values/label_names for a regression task", "task_type")
        if values is not None and len(values) < 2:
            raise Expected("at least two labels", "label_values")
        if values is not None and len({label_key(value) for value in values}) != len(values):
            raise Expected("distinct labels", "label_values")
        if names is not None and (values is None or len(names) != len(values)):
            raise Expected("one name per entry of label_values", "label_names")
        if names is not None and len({str(name) for name in names}) != len(names):
            raise Expected("distinct names", "label_names")
        return self


class LocalFileParams(LabelledColumns):
    """``data.local_file``: a CSV/TSV, Parquet (always UTF-8), JSON Lines or plain text file."""

    path: Text | None
    encoding: Annotated[str, AfterValidator(check_codec)]
    read_args: dict[str, Any]

    @model_validator(mode="after")
    def _no_encoding_read_arg(self) -> LocalFileParams:
        if "encoding" in self.read_args:
            raise Expected("no read_args.encoding: set data.local_file.encoding", "read_args")
        return self


class GlueParams(Block):
    """``data.glue``: a GLUE task through ``datasets`` (online, or local ``data_files``)."""

    task: Text
    data_files: Any
    splits: Texts | None
    cache_dir: Text | None


SplitSize = Annotated[int | float, BeforeValidator(check_split_size)]


class SplitParams(Block):
    """``data.split``: sizes (counts or fractions) and the seed of the stratified split."""

    train: SplitSize
    validation: SplitSize
    test: SplitSize
    seed: Annotated[int, Ge(0)]

    @model_validator(mode="after")
    def _fractions(self) -> SplitParams:
        total = sum(size for size in self.sizes if isinstance(size, float))
        if total > 1.0 + 1e-9:
            raise Expected(f"fractions adding up to at most 1, got {total:.4g}", "train")
        return self

    @property
    def sizes(self) -> tuple[int | float, int | float, int | float]:
        return (self.train, self.validation, self.test)


class DataParams(Block):
    """``data``: which source the rows come from, how they are read, and how they are split."""

    source: Literal["catalog", "csv", "parquet", "jsonl", "text", "glue"]
    catalog: LabelledColumns
    local_file: LocalFileParams
    glue: GlueParams
    split: SplitParams

    @model_validator(mode="after")
    def _source_is_readable(self) -> DataParams:
        if self.source in ("csv", "parquet", "jsonl", "text") and self.local_file.path is None:
            raise Expected(
                f"data.local_file.path to be set when data.source is {self.source!r}", "source"
            )
        # The formats this project decodes itself take no pandas options, except compression.
        unread = sorted(set(self.local_file.read_args) - {"compression"})
        if self.source in ("jsonl", "text") and unread:
            raise Expected(
                f"no data.local_file.read_args {unread} when data.source is {self.source!r} "
                "(they are pandas.read_csv/read_parquet options; only compression applies)",
                "source",
            )
        return self


def label_key(value: Any) -> str:
    """Compare labels across int/float/str spellings: 1, 1.0 and "1" are the same label."""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class TrainingLoopParams(Block):
    """The AdamW loop's knobs fine-tuning and refinement share (``training.TrainingOptions``)."""

    epochs: PositiveInt
    batch_size: PositiveInt
    learning_rate: Annotated[float, Gt(0)]
    weight_decay: Annotated[float, Ge(0)]
    warmup_ratio: Annotated[float, Ge(0), Lt(1)]
    max_grad_norm: Annotated[float, Gt(0)]
    eval_batch_size: PositiveInt
    progress: bool

    def training_options(self, max_length: int, seed: int) -> Any:
        """The loop's ``TrainingOptions`` for this block, the model's length and the run seed."""
        from weighted_lowrank.hf.training import TrainingOptions

        loop = self.model_dump(include=set(TrainingLoopParams.model_fields) - {"progress"})
        return TrainingOptions(**loop, max_length=max_length, seed=seed)


class FineTuningParams(TrainingLoopParams):
    """``fine_tuning``: the loop before compression; ``enabled: false`` compresses the model as
    given (a pretrained language model, or a classifier already fine-tuned for the task)."""

    enabled: bool


class RefinementParams(TrainingLoopParams):
    """``refinement``: the fine-tuning loop again, after compression (``refined`` pipeline)."""

    #: all: every parameter; factors: only the low-rank factors (the rest stays frozen).
    trainable: Literal["all", "factors"]

    def describe(self) -> str:
        """What a refined row's ``refinement`` param says."""
        return f"{self.trainable}, {self.epochs} epoch(s)"


class FisherParams(Block):
    """``fisher_estimation``: examples, estimator, batching and the calibration statistics."""

    num_examples: PositiveInt | None
    mode: Annotated[Text, owned_choice("lowrank.fisher.FISHER_MODES")]
    targets: Targets
    batch_size: PositiveInt
    statistics: Annotated[tuple[str, ...], BeforeValidator(check_statistics)]
    progress: bool


class SvdRiskParams(Block):
    """``svd_risk``: which statistic flags a layer as high risk, at which threshold."""

    statistic: Text
    thresholds: dict[str, float]
    top_fraction: Annotated[float, Gt(0), Le(1)]
    compare_solvers: bool

    @model_validator(mode="after")
    def _statistic_has_threshold(self) -> SvdRiskParams:
        from weighted_lowrank.lowrank.risk import RISK_STATISTICS, check_risk_statistic

        try:
            check_risk_statistic(self.statistic, self.compare_solvers)
        except ValueError as error:
            raise Expected(str(error), "statistic") from None
        if not set(self.thresholds) <= set(RISK_STATISTICS):
            raise Expected(f"thresholds of known statistics {list(RISK_STATISTICS)}", "thresholds")
        if self.statistic not in self.thresholds:
            raise Expected(
                f"a number at thresholds.{self.statistic} (the selected statistic needs one)",
                "thresholds",
            )
        return self

    @property
    def threshold(self) -> float:
        return self.thresholds[self.statistic]


class LatencyParams(Block):
    """``evaluation.latency``: the CPU forward-pass timing protocol."""

    batch_size: PositiveInt
    sequence_length: PositiveInt
    repeats: PositiveInt
    warmup: Annotated[int, Ge(0)]
    threads: PositiveInt | None
    seed: int


class EvaluationParams(Block):
    """``evaluation``: test-split scoring and latency of every model."""

    batch_size: PositiveInt
    device: Device
    latency: LatencyParams


class ReportingParams(Block):
    """``reporting``: what the plots show, and the paired tests' bootstrap."""

    convergence_layers: PositiveInt
    bootstrap_resamples: PositiveInt
    bootstrap_seed: int


class RiskValidationParams(Block):
    """``risk_validation``: per-layer and whole-model damage against the loss models' forecasts."""

    batch_size: PositiveInt
    max_examples: PositiveInt | None
    statistics: Texts | None
    curvature: bool
    loss_models: Texts | None


class RunParameters(Block):
    """A run's parameters: the shared scalars and every block a node reads; the solver blocks
    (``<solver>: {options: …}``) are the extra keys, checked by :func:`parse_parameters`."""

    model_config = ConfigDict(extra="allow")

    seed: int
    device: Device
    data: DataParams
    model: ModelParams
    fine_tuning: FineTuningParams
    fisher_estimation: FisherParams
    svd_risk: SvdRiskParams
    compression: CompressionParams
    refinement: RefinementParams
    evaluation: EvaluationParams
    reporting: ReportingParams
    risk_validation: RiskValidationParams
    # Not read by nodes: `--params mlflow_tracking_uri=…` reaches conf/base/mlflow.yml.
    mlflow_tracking_uri: Text | None = None


#: Every block a node reads, by its top-level YAML key.
BLOCKS: dict[str, type[Block]] = {
    name: field.annotation
    for name, field in RunParameters.model_fields.items()
    if _is_block(field.annotation)
}


def parse_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Every block of a run's parameters, typed: ``{"params:<block>": object}``, and each solver's
    ``"params:<solver>.options"`` dict checked by the solver registry."""
    from weighted_lowrank.lowrank.solvers import SOLVERS, check_solver_options

    run = RunParameters.model_validate(parameters)
    solvers = run.model_extra or {}
    missing = [solver for solver in SOLVERS if solver not in solvers]
    unknown = sorted(set(solvers) - set(SOLVERS))
    if missing or unknown:
        raise ParameterError(
            f"parameters lack the solver blocks {missing} and have unknown top-level keys "
            f"{unknown}; expected the blocks {[*RunParameters.model_fields]} and one per solver "
            f"{list(SOLVERS)} (conf/base defines them all)"
        )
    typed = {f"params:{name}": getattr(run, name) for name in ("seed", "device", *BLOCKS)}
    for solver in SOLVERS:
        options = SolverParams.model_validate(solvers[solver], path=solver).options
        try:
            check_solver_options(solver, options)
        except ValueError as error:
            raise ParameterError(f"parameters {solver}.options: {error}") from None
        typed[f"params:{solver}.options"] = options
    return typed
