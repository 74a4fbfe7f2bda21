"""Typed Kedro parameters: one frozen dataclass per block, parsed and checked once per run.

The YAML under ``conf/`` is the only place that holds defaults: every key of a block must be
present there, and an unknown key is an error. Nodes name these classes in their signatures;
Kedro 1.x then builds each block from the run's parameters before any node runs, and
``parameter_checks.ParameterChecks`` parses every block — solver options and blocks of pipelines not being
run included — at the start of the run, so a typo in a block read late (refinement, evaluation)
fails at once, and nodes trust what they receive. Errors name the key, the value and what is
expected.

No torch at import time: ``settings.py`` loads this module for every ``kedro`` command; checks
that need the numerical core import it when they run.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

#: Top-level keys that are not parameter blocks read by nodes but are legitimate in a run's
#: parameters (``--params mlflow_tracking_uri=…`` reaches conf/base/mlflow.yml).
RUNTIME_ONLY_KEYS = ("mlflow_tracking_uri",)

Check = Callable[[Any], Any]
BlockT = TypeVar("BlockT", bound="Block")


class ParameterError(ValueError):
    """A parameter has a value the run cannot use; the message names key, value and expectation."""


class Expected(Exception):
    """Raised by a check: ``what`` the value should have been (optionally for another ``key``)."""

    def __init__(self, what: str, key: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.key = key


def checked(check: Check) -> Any:
    """A dataclass field whose YAML value goes through ``check`` (which may normalise it)."""
    return field(metadata={"check": check})


@dataclass(frozen=True, init=False, eq=False)
class Block(dict):
    """A parameter block: its fields are exactly the block's YAML keys.

    Kedro 1.x instantiates every dataclass a node's signature names for a ``params:`` input as
    ``Block(**yaml_values)`` before the run starts, so construction *is* the parse: unknown and
    missing keys, every field's check, nested blocks and cross-field rules. A block is also a
    read-only ``dict`` of its values, which lets kedro-mlflow flatten it into one MLflow param per
    key (``model.source``, …) as it does for plain dictionaries.
    """

    #: The block's top-level YAML key (nested blocks get theirs from the enclosing block).
    PATH: ClassVar[str] = ""
    #: Keys that used to exist, with what replaced them (shown when someone still sets one).
    RENAMED: ClassVar[dict[str, str]] = {}

    def __init__(self, **values: Any) -> None:
        self._fill(values, self.PATH or type(self).__name__)

    @classmethod
    def parse(cls: type[BlockT], values: Any, path: str) -> BlockT:
        """Build the block at ``path`` (e.g. ``"evaluation.latency"``) from its YAML mapping."""
        if not isinstance(values, Mapping):
            names = [item.name for item in fields(cls)]
            raise ParameterError(f"parameters {path}={values!r}: expected a mapping with {names}")
        block = cls.__new__(cls)
        block._fill(dict(values), path)
        return block

    def _fill(self, values: dict[str, Any], path: str) -> None:
        names = [item.name for item in fields(self)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            hints = "".join(f"; {self.RENAMED[key]}" for key in unknown if key in self.RENAMED)
            raise ParameterError(
                f"parameters {path} has unknown keys {unknown}; expected {names}{hints}"
            )
        missing = [name for name in names if name not in values]
        if missing:
            raise ParameterError(
                f"parameters {path} lacks keys {missing}; every key of a block is set in "
                "conf/base (defaults live there)"
            )
        kinds = typing.get_type_hints(type(self))
        checked: dict[str, Any] = {}
        for item in fields(self):
            value, kind = values[item.name], kinds[item.name]
            if isinstance(kind, type) and issubclass(kind, Block):
                checked[item.name] = kind.parse(value, f"{path}.{item.name}")
                continue
            check = item.metadata.get("check")
            try:
                checked[item.name] = value if check is None else check(value)
            except Expected as error:
                raise _error(path, item.name, value, error.what) from None
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_path", path)
        dict.update(self, checked)
        try:
            self._validate()
        except Expected as error:
            key = error.key or ""
            raise _error(path, key, values.get(key) if key else None, error.what) from None

    def _validate(self) -> None:
        """Rules across fields; raise :class:`Expected` naming the key."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Copies (Kedro deep-copies datasets) rebuild through the parse, not item by item.
        return (_rebuild, (type(self), dict(self), self._path))

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"parameters {self._path} are read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only


def _rebuild(cls: type[BlockT], values: dict[str, Any], path: str) -> BlockT:
    return cls.parse(values, path)


def _error(path: str, key: str, value: Any, what: str) -> ParameterError:
    if not key:
        return ParameterError(f"parameters {path}: expected {what}")
    return ParameterError(f"parameter {path}.{key}={value!r}: expected {what}")


# ----------------------------------------------------------------------------- value checks


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Expected("a positive int")
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Expected("an int >= 0")
    return value


def any_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Expected("an int")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Expected("true or false")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Expected("a non-empty string")
    return value


def mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise Expected("a mapping")
    return dict(value)


def optional(check: Check) -> Check:
    def check_optional(value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except Expected as error:
            raise Expected(f"{error.what} or null") from None

    return check_optional


def one_of(*choices: Any) -> Check:
    def check_choice(value: Any) -> Any:
        if value not in choices:
            raise Expected(f"one of {list(choices)}")
        return value

    return check_choice


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A real number in the interval from ``low`` to ``high`` (ends open or closed)."""

    def check_number(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) if ok else False
        if ok:
            ok = (value > low if low_open else value >= low) and (
                value < high if high_open else value <= high
            )
        if not ok:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            raise Expected(f"a number in {left}{low:g}, {high:g}{right}")
        return float(value)

    return check_number


def int_at_least(minimum: int) -> Check:
    def check_int(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise Expected(f"an int >= {minimum}")
        return value

    return check_int


def string_list(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise Expected("a non-empty list of strings")
    if not all(isinstance(item, str) and item for item in value):
        raise Expected("a list of non-empty strings")
    return list(value)


def targets(value: Any) -> str | tuple[str, ...] | None:
    """``null`` (the default projections), a regex over module names, or a list of names."""
    if value is None or (isinstance(value, str) and value):
        return value
    try:
        return tuple(string_list(value))
    except Expected:
        raise Expected("null, a regex over module names or a list of module names") from None


def device(value: Any) -> str:
    """``auto``, ``cpu`` or ``cuda[:N]``; CUDA without a GPU fails here, at the start of a run."""
    if not isinstance(value, str):
        raise Expected("auto, cpu or cuda")
    from weighted_lowrank.lowrank.devices import resolve_device

    try:
        resolve_device(value)
    except ValueError as error:
        raise Expected(f"auto, cpu or cuda on a machine that has it ({error})") from None
    return value


def codec(value: Any) -> str:
    """``auto`` or a text codec Python knows: utf-8, latin-1, cp1252, utf-16, … (not base64)."""
    if isinstance(value, str) and value:
        if value == "auto":
            return value
        try:
            "".encode(value)  # looks the codec up, and refuses bytes-to-bytes ones
        except LookupError:
            pass
        else:
            return value
    raise Expected("auto or a Python text codec name (utf-8, latin-1, cp1252, utf-16, …)")


def split_size(value: Any) -> int | float:
    """A count of rows (int >= 1) or a fraction of the cleaned rows (float in (0, 1])."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    raise Expected("a count >= 1 or a fraction in (0, 1]")


# ----------------------------------------------------------------------------- shared blocks

#: ``model.task`` values (hf.MODEL_TASKS; no transformers import here).
MODEL_TASKS = ("auto", "sequence_classification", "causal_lm")


@dataclass(frozen=True, init=False, eq=False)
class ModelParams(Block):
    """``model``: which checkpoint is fine-tuned and compressed, for which task, and its
    tokenization length (a language model's block length)."""

    PATH: ClassVar[str] = "model"

    source: str = checked(text)
    task: str = checked(one_of(*MODEL_TASKS))
    max_length: int = checked(int_at_least(2))

    def resolved_task(self) -> str:
        """``task``, or for ``auto`` the task the checkpoint's config declares (reads
        ``config.json``; see ``hf.resolve_task``)."""
        from weighted_lowrank.hf.models import resolve_task

        return resolve_task(self.source, self.task)


#: How ``compression.budget`` is spread over the targeted layers (lowrank/allocation.py).
ALLOCATIONS = ("uniform", "global")
#: What prices each rank of a loss curve (solvers.CURVE_LOSS_MODELS; no torch import here).
CURVE_LOSS_MODELS = ("own", "kronecker")


@dataclass(frozen=True, init=False, eq=False)
class CompressionParams(Block):
    """``compression``: the budget, how it is spread over layers, targets, seed and device every
    solver shares."""

    PATH: ClassVar[str] = "compression"

    budget: float = checked(number(0, 1, low_open=True, high_open=True))
    allocation: str = checked(one_of(*ALLOCATIONS))
    curve_loss_model: str = checked(one_of(*CURVE_LOSS_MODELS))
    targets: str | tuple[str, ...] | None = checked(targets)
    seed: int = checked(any_int)
    device: str = checked(device)
    dask_address: str | None = checked(optional(text))


@dataclass(frozen=True, init=False, eq=False)
class SolverParams(Block):
    """``<solver>``: the solver's own options (names and defaults: ``solver_options(name)``)."""

    options: dict[str, Any] = checked(mapping)


# ----------------------------------------------------------------------------- data


TASK_TYPES = ("classification", "regression")


@dataclass(frozen=True, init=False, eq=False)
class LabelledColumns(Block):
    """Where the text, optional text pair and label live in a table, and which labels count."""

    text_column: str = checked(text)
    text_pair_column: str | None = checked(optional(text))
    label_column: str = checked(text)
    label_values: list[Any] | None = checked(optional(list))
    label_names: list[Any] | None = checked(optional(list))
    task_type: str = checked(one_of(*TASK_TYPES))
    unescape_html: bool = checked(boolean)

    def _validate(self) -> None:
        values, names = self.label_values, self.label_names
        if self.task_type == "regression":
            if values is not None or names is not None:
                raise Expected("no label_values/label_names for a regression task", "task_type")
            return
        if values is not None:
            if len(values) < 2:
                raise Expected("at least two labels", "label_values")
            keys = [label_key(value) for value in values]
            if len(set(keys)) != len(keys):
                raise Expected("distinct labels", "label_values")
        if names is not None:
            if values is None or len(names) != len(values):
                raise Expected("one name per entry of label_values", "label_names")
            if len({str(name) for name in names}) != len(names):
                raise Expected("distinct names", "label_names")


@dataclass(frozen=True, init=False, eq=False)
class LocalFileParams(LabelledColumns):
    """``data.local_file``: a CSV/TSV, Parquet, JSON Lines or plain text file; ``path`` is
    required when it is the source. ``encoding`` decodes the text formats (``auto`` detects it,
    see ``text_files``); Parquet stores UTF-8 by definition and ignores it."""

    path: str | None = checked(optional(text))
    encoding: str = checked(codec)
    read_args: dict[str, Any] = checked(mapping)

    def _validate(self) -> None:
        super()._validate()
        if "encoding" in self.read_args:
            raise Expected("no read_args.encoding: set data.local_file.encoding", "read_args")


@dataclass(frozen=True, init=False, eq=False)
class GlueParams(Block):
    """``data.glue``: a GLUE task through ``datasets`` (online, or local ``data_files``)."""

    task: str = checked(text)
    data_files: Any = checked(lambda value: value)
    splits: list[str] | None = checked(optional(string_list))
    cache_dir: str | None = checked(optional(text))


@dataclass(frozen=True, init=False, eq=False)
class SplitParams(Block):
    """``data.split``: sizes (counts or fractions) and the seed of the stratified split."""

    train: int | float = checked(split_size)
    validation: int | float = checked(split_size)
    test: int | float = checked(split_size)
    seed: int = checked(non_negative_int)

    def _validate(self) -> None:
        fractions = [size for size in self.sizes if isinstance(size, float)]
        if sum(fractions) > 1.0 + 1e-9:
            raise Expected(f"fractions adding up to at most 1, got {sum(fractions):.4g}", "train")

    @property
    def sizes(self) -> tuple[int | float, int | float, int | float]:
        return (self.train, self.validation, self.test)


SOURCE_TYPES = ("catalog", "csv", "parquet", "jsonl", "text", "glue")
#: Sources read from ``data.local_file.path``.
FILE_SOURCES = ("csv", "parquet", "jsonl", "text")
#: File sources this project decodes itself: pandas options (read_args) do not apply, except the
#: compression.
_DECODED_SOURCES = ("jsonl", "text")


@dataclass(frozen=True, init=False, eq=False)
class DataParams(Block):
    """``data``: which source the rows come from, how they are read, and how they are split."""

    PATH: ClassVar[str] = "data"

    source: str = checked(one_of(*SOURCE_TYPES))
    catalog: LabelledColumns
    local_file: LocalFileParams
    glue: GlueParams
    split: SplitParams

    def _validate(self) -> None:
        if self.source in FILE_SOURCES and self.local_file.path is None:
            raise Expected(
                f"data.local_file.path to be set when data.source is {self.source!r}", "source"
            )
        unread = sorted(set(self.local_file.read_args) - {"compression"})
        if self.source in _DECODED_SOURCES and unread:
            raise Expected(
                f"no data.local_file.read_args {unread} when data.source is {self.source!r} "
                "(they are pandas.read_csv/read_parquet options; only compression applies)",
                "source",
            )


def label_key(value: Any) -> str:
    """Compare labels across int/float/str spellings: 1, 1.0 and "1" are the same label."""
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True, init=False, eq=False)
class TrainingLoopParams(Block):
    """AdamW with linear warm-up and decay (see ``training.TrainingOptions``): the knobs fine-tuning
    and refinement share."""

    epochs: int = checked(positive_int)
    batch_size: int = checked(positive_int)
    learning_rate: float = checked(number(0, math.inf, low_open=True, high_open=True))
    weight_decay: float = checked(number(0, math.inf, high_open=True))
    warmup_ratio: float = checked(number(0, 1, high_open=True))
    max_grad_norm: float = checked(number(0, math.inf, low_open=True, high_open=True))
    eval_batch_size: int = checked(positive_int)
    progress: bool = checked(boolean)

    def training_options(self, max_length: int, seed: int) -> Any:
        """The loop's ``TrainingOptions`` for this block, the model's length and the run seed."""
        from weighted_lowrank.hf.training import TrainingOptions

        return TrainingOptions(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio,
            max_length=max_length,
            max_grad_norm=self.max_grad_norm,
            seed=seed,
            eval_batch_size=self.eval_batch_size,
        )


@dataclass(frozen=True, init=False, eq=False)
class FineTuningParams(TrainingLoopParams):
    """``fine_tuning``: the training loop before compression; ``enabled: false`` compresses the
    model as given (the usual setting for a pretrained language model, or a classifier already
    fine-tuned for the task)."""

    PATH: ClassVar[str] = "fine_tuning"

    enabled: bool = checked(boolean)


@dataclass(frozen=True, init=False, eq=False)
class RefinementParams(TrainingLoopParams):
    """``refinement``: the fine-tuning loop again, after compression (``refined`` pipeline)."""

    PATH: ClassVar[str] = "refinement"

    RENAMED: ClassVar[dict[str, str]] = {
        "enabled": "refinement runs when its pipeline does: `kedro run --pipelines refined` "
        "(the whole run with refinement) or `kedro run --pipelines refinement` after a run"
    }

    #: all: every parameter; factors: only the low-rank factors (the rest stays frozen).
    trainable: str = checked(one_of("all", "factors"))

    def describe(self) -> str:
        """What a refined row's ``refinement`` param says."""
        return f"{self.trainable}, {self.epochs} epoch(s)"


# ----------------------------------------------------------------------------- analysis


def fisher_mode(value: Any) -> str:
    from weighted_lowrank.lowrank.fisher import FISHER_MODES

    return one_of(*FISHER_MODES)(value)


def calibration_statistics(value: Any) -> tuple[str, ...]:
    """A list of calibration statistic names, each known and listed once (empty: none)."""
    from weighted_lowrank.lowrank.calibration import CALIBRATION_STATISTICS, check_statistics

    expected = f"a list of names from {list(CALIBRATION_STATISTICS)}, each at most once ([]: none)"
    if not isinstance(value, list | tuple):
        raise Expected(expected)
    try:
        return check_statistics(value)
    except ValueError as error:
        raise Expected(f"{expected}; {error}") from None


@dataclass(frozen=True, init=False, eq=False)
class FisherParams(Block):
    """``fisher_estimation``: examples, estimator, batching and the calibration statistics."""

    PATH: ClassVar[str] = "fisher_estimation"

    num_examples: int | None = checked(optional(positive_int))
    mode: str = checked(fisher_mode)
    targets: str | tuple[str, ...] | None = checked(targets)
    batch_size: int = checked(positive_int)
    statistics: tuple[str, ...] = checked(calibration_statistics)
    progress: bool = checked(boolean)


@dataclass(frozen=True, init=False, eq=False)
class SvdRiskParams(Block):
    """``svd_risk``: which statistic flags a layer as high risk, at which threshold."""

    PATH: ClassVar[str] = "svd_risk"

    RENAMED: ClassVar[dict[str, str]] = {
        "phi_threshold": "phi_threshold is now thresholds.phi (with statistic: phi)"
    }

    statistic: str = checked(text)
    thresholds: dict[str, float] = checked(mapping)
    top_fraction: float = checked(number(0, 1, low_open=True))
    compare_solvers: bool = checked(boolean)

    def _validate(self) -> None:
        from weighted_lowrank.lowrank.risk import RISK_STATISTICS, check_risk_statistic

        try:
            check_risk_statistic(self.statistic, self.compare_solvers)
        except ValueError as error:
            raise Expected(str(error), "statistic") from None
        unknown = sorted(set(self.thresholds) - set(RISK_STATISTICS))
        if unknown:
            raise Expected(f"thresholds of known statistics {list(RISK_STATISTICS)}", "thresholds")
        value = self.thresholds.get(self.statistic)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise Expected(
                f"a number at thresholds.{self.statistic} (the selected statistic needs one)",
                "thresholds",
            )

    @property
    def threshold(self) -> float:
        """The threshold of the selected statistic."""
        return float(self.thresholds[self.statistic])


@dataclass(frozen=True, init=False, eq=False)
class LatencyParams(Block):
    """``evaluation.latency``: the CPU forward-pass timing protocol."""

    batch_size: int = checked(positive_int)
    sequence_length: int = checked(positive_int)
    repeats: int = checked(positive_int)
    warmup: int = checked(non_negative_int)
    threads: int | None = checked(optional(positive_int))
    seed: int = checked(any_int)


@dataclass(frozen=True, init=False, eq=False)
class EvaluationParams(Block):
    """``evaluation``: test-split scoring and latency of every model."""

    PATH: ClassVar[str] = "evaluation"

    batch_size: int = checked(positive_int)
    device: str = checked(device)
    latency: LatencyParams


@dataclass(frozen=True, init=False, eq=False)
class ReportingParams(Block):
    """``reporting``: what the plots show, and the paired tests' bootstrap."""

    PATH: ClassVar[str] = "reporting"

    convergence_layers: int = checked(positive_int)
    bootstrap_resamples: int = checked(positive_int)
    bootstrap_seed: int = checked(any_int)


@dataclass(frozen=True, init=False, eq=False)
class RiskValidationParams(Block):
    """``risk_validation``: the per-layer and whole-model damage measurement and the loss models
    it is set against (pipeline ``risk_validation``)."""

    PATH: ClassVar[str] = "risk_validation"

    batch_size: int = checked(positive_int)
    max_examples: int | None = checked(optional(positive_int))
    statistics: list[str] | None = checked(optional(string_list))
    curvature: bool = checked(boolean)
    # Names are checked where the compressed models and statistics are known: by the
    # risk_validation node, before its first evaluation.
    solvers: list[str] = checked(string_list)
    loss_models: list[str] | None = checked(optional(string_list))


# ----------------------------------------------------------------------------- the whole run

#: Every block a node reads, by its top-level YAML key.
BLOCKS: dict[str, type[Block]] = {
    "data": DataParams,
    "model": ModelParams,
    "fine_tuning": FineTuningParams,
    "fisher_estimation": FisherParams,
    "svd_risk": SvdRiskParams,
    "compression": CompressionParams,
    "refinement": RefinementParams,
    "evaluation": EvaluationParams,
    "reporting": ReportingParams,
    "risk_validation": RiskValidationParams,
}
#: Top-level scalars shared by every pipeline.
SCALARS: dict[str, Check] = {"seed": any_int, "device": device}


def parse_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Every block of a run's parameters, typed: ``{"params:<block>": object}``.

    Solver blocks become ``"params:<solver>.options"`` dicts checked by the solver registry
    (unknown option names and bad values fail here, before fine-tuning).
    """
    from weighted_lowrank.lowrank.solvers import SOLVERS, solver_options
    from weighted_lowrank.lowrank.solvers._common import resolve_options

    expected = [*SCALARS, *BLOCKS, *SOLVERS]
    missing = [name for name in expected if name not in parameters]
    if missing:
        raise ParameterError(f"parameters lack the blocks {missing}; conf/base defines them all")
    unknown = sorted(set(parameters) - set(expected) - set(RUNTIME_ONLY_KEYS))
    if unknown:
        raise ParameterError(
            f"parameters have unknown top-level keys {unknown}; expected {expected} "
            f"(and optionally {list(RUNTIME_ONLY_KEYS)})"
        )
    typed: dict[str, Any] = {}
    for name, check in SCALARS.items():
        try:
            typed[f"params:{name}"] = check(parameters[name])
        except Expected as error:
            raise ParameterError(
                f"parameter {name}={parameters[name]!r}: expected {error.what}"
            ) from None
    for name, block in BLOCKS.items():
        typed[f"params:{name}"] = block.parse(parameters[name], name)
    for solver in SOLVERS:
        options = SolverParams.parse(parameters[solver], solver).options
        try:
            resolve_options(solver, options, solver_options(solver))
        except ValueError as error:
            raise ParameterError(f"parameters {solver}.options: {error}") from None
        typed[f"params:{solver}.options"] = options
    return typed
