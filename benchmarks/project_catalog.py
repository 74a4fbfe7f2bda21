"""The project's Kedro catalog for benchmark scripts, optionally with pinned dataset versions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import CatalogProtocol

REPO_ROOT = Path(__file__).resolve().parents[1]


def project_catalog(load_versions: dict[str, str] | None = None) -> Any:
    """The catalog of the project's base/local conf; ``load_versions`` pins datasets to versions
    (what ``catalog.load`` returns; each load asks ``DataCatalog.load`` for that version)."""
    bootstrap_project(REPO_ROOT)
    with KedroSession.create(project_path=REPO_ROOT) as session:
        catalog = session.load_context().catalog
    return _Pinned(catalog, load_versions) if load_versions else catalog


@dataclass
class _Pinned:
    catalog: CatalogProtocol
    versions: dict[str, str]

    def load(self, name: str) -> Any:
        return self.catalog.load(name, version=self.versions.get(name))


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
    fisher_information = catalog.load("fisher_information")
    fisher = fisher_information["tensors"]
    return Calibrated(
        model=catalog.load("fine_tuned_model").model,
        fisher=fisher,
        num_examples=int(fisher_information["metadata"].get("num_examples", 1)),
        statistics=catalog.load("calibration_statistics")["tensors"],
        names=[key[: -len(".weight")] for key in fisher],
    )
