"""Project settings: the hooks (kedro-mlflow's in its plugin's place) and the config loader."""

from __future__ import annotations

from pathlib import Path

from kedro.config import OmegaConfigLoader
from kedro.utils import find_kedro_project

from weighted_lowrank.analysis.run_summary import RunSummary
from weighted_lowrank.kedro_glue.hooks import LineageCheck, SavedVersionChecks
from weighted_lowrank.kedro_glue.parameter_checks import ParameterChecks, TypedParamsMlflowHook


def _project_root() -> str:
    """The Kedro project root, whatever the current working directory inside it.

    Relative sqlite URIs follow the cwd, so the MLflow store is pinned to this path instead.
    """
    found = find_kedro_project(Path.cwd())
    return str(Path(found) if found else Path(__file__).resolve().parents[2])


HOOKS = (
    ParameterChecks(),
    LineageCheck(),
    SavedVersionChecks(),
    TypedParamsMlflowHook(),
    RunSummary(),
)
# TypedParamsMlflowHook is kedro-mlflow's own hook, handed the typed blocks as dicts so that it
# flattens them into one MLflow param per key (it registers in the plugin's place).
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow",)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"project_root": _project_root},
    # Environments (conf/local, conf/smoke) override single keys, not whole parameter blocks.
    "merge_strategy": {"parameters": "soft"},
}
