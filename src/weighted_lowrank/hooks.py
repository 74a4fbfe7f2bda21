"""Project hooks: parameter checks that must fail before any expensive node runs."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.pipeline import Pipeline


class EarlyParameterChecks:
    """Validates parameters consumed late in a run at its start.

    ``refinement`` is read only after fine-tuning, Fisher and every solver have run; a typo there
    would otherwise surface minutes into a run.
    """

    @hook_impl
    def before_pipeline_run(
        self, run_params: dict[str, Any], pipeline: Pipeline, catalog: Any
    ) -> None:
        if "params:refinement" in pipeline.inputs():
            # Imported here: settings.py loads this module for every kedro command, and the
            # nodes pull in torch and transformers (≈ 5 s).
            from weighted_lowrank.pipelines.refinement.nodes import check_refinement

            model = catalog.load("params:model")
            check_refinement(
                catalog.load("params:refinement"),
                int(model["max_length"]),
                int(catalog.load("params:seed")),
            )
