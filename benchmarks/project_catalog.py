"""The project's Kedro catalog for benchmark scripts, optionally with pinned dataset versions."""

from __future__ import annotations

from pathlib import Path

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
