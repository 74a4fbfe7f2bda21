"""The project's Kedro catalog for benchmark scripts, optionally with pinned dataset versions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import CatalogProtocol

REPO_ROOT = Path(__file__).resolve().parents[1]


def project_catalog(load_versions: dict[str, str] | None = None) -> CatalogProtocol:
    """The catalog of the project's base/local conf; ``load_versions`` pins datasets to versions."""
    bootstrap_project(REPO_ROOT)
    with KedroSession.create(project_path=REPO_ROOT) as session:
        context = session.load_context()
        if not load_versions:
            return context.catalog
        # The public catalog loads the latest versions; pinning needs the context's factory.
        return context._get_catalog(load_versions=load_versions)


@dataclass
class Calibrated:
    """What a default run leaves for the solvers: the fine-tuned model, its Fisher (summed over
    ``num_examples``), its calibration statistics and the targeted module names."""

    model: Any
    fisher: dict[str, Any]
    num_examples: int
    statistics: dict[str, Any]
    names: list[str]


def load_calibrated(catalog: CatalogProtocol) -> Calibrated:
    """The latest (or pinned) fine-tuned model with its Fisher and calibration statistics."""
    from weighted_lowrank.pipelines.fisher_estimation.nodes import recorded_num_examples

    fisher_information = catalog.load("fisher_information")
    fisher = fisher_information["tensors"]
    return Calibrated(
        model=catalog.load("fine_tuned_model").model,
        fisher=fisher,
        num_examples=recorded_num_examples(fisher_information["metadata"]) or 1,
        statistics=catalog.load("calibration_statistics")["tensors"],
        names=[key[: -len(".weight")] for key in fisher],
    )
