"""The project hooks: typed parameters handed to nodes, and the lineage check between inputs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from kedro.framework.project import configure_project
from kedro.io import DataCatalog, MemoryDataset, Version
from kedro.pipeline import Node
from kedro.validation.parameter_validator import ParameterValidator

from tests.conftest import conf_parameters, make_tiny_bundle
from weighted_lowrank.kedro_glue.datasets import HFModelDataset, SafetensorsDataset
from weighted_lowrank.kedro_glue.hooks import LineageCheck
from weighted_lowrank.kedro_glue.lineage import FINGERPRINT_KEY, fingerprint_of, with_fingerprint
from weighted_lowrank.kedro_glue.parameter_checks import ParameterChecks
from weighted_lowrank.kedro_glue.parameters import EvaluationParams, ParameterError
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.pipeline_registry import register_pipelines


def _identity(*values):
    return values


def test_parameter_checks_fail_at_pipeline_start_for_blocks_no_node_types():
    solver = {**conf_parameters(), "als": {"options": {"damping": -1.0}}}
    catalog = DataCatalog({"parameters": MemoryDataset(solver)})
    with pytest.raises(ParameterError, match=r"als\.options.*damping"):
        ParameterChecks().before_pipeline_run(run_params={}, pipeline=None, catalog=catalog)


def test_parameter_checks_accept_the_blocks_kedro_already_built():
    """Kedro 1.x instantiates the typed blocks nodes name; the hook re-parses them unchanged."""
    configure_project("weighted_lowrank")
    typed = ParameterValidator(register_pipelines()).validate_raw_params(conf_parameters())
    assert isinstance(typed["evaluation"], EvaluationParams)
    assert typed["evaluation"] == EvaluationParams.model_validate(conf_parameters()["evaluation"])
    catalog = DataCatalog({"parameters": MemoryDataset(typed)})
    ParameterChecks().before_pipeline_run(run_params={}, pipeline=None, catalog=catalog)


def test_a_run_that_estimates_statistics_must_estimate_what_its_solvers_need():
    configure_project("weighted_lowrank")
    pipelines = register_pipelines()
    base = conf_parameters()
    only_a = {
        **base,
        "fisher_estimation": {**base["fisher_estimation"], "statistics": ["input_moment"]},
    }
    catalog = DataCatalog({"parameters": MemoryDataset(only_a)})
    with pytest.raises(ParameterError, match=r"'kfwsvd': \['output_moment'\].*'asvd'"):
        ParameterChecks().before_pipeline_run(
            run_params={}, pipeline=pipelines["__default__"], catalog=catalog
        )
    # The default risk signal is the Kronecker prediction: it needs G too.
    with pytest.raises(ParameterError, match=r"svd_risk\.statistic=svd_kronecker_loss"):
        ParameterChecks().before_pipeline_run(
            run_params={},
            pipeline=pipelines["fisher_estimation"] + pipelines["svd_risk"],
            catalog=catalog,
        )
    # Without a consumer, or without the Fisher pass, there is nothing to cover.
    for name in ("fisher_estimation", "factorization"):
        ParameterChecks().before_pipeline_run(
            run_params={}, pipeline=pipelines[name], catalog=catalog
        )
    # An element-wise solver started from kfwsvd needs both moments too.
    started = {**only_a, "tfwsvd": {"options": {"init": "kfwsvd"}}}
    catalog = DataCatalog({"parameters": MemoryDataset(started)})
    with pytest.raises(ParameterError, match=r"'tfwsvd': \['output_moment'\]"):
        ParameterChecks().before_pipeline_run(
            run_params={}, pipeline=pipelines["__default__"], catalog=catalog
        )
    # Curves priced by the Kronecker model need both moments for every solver, svd included.
    priced = {**only_a, "compression": {**base["compression"], "curve_loss_model": "kronecker"}}
    catalog = DataCatalog({"parameters": MemoryDataset(priced)})
    with pytest.raises(ParameterError, match=r"'svd': \['output_moment'\]"):
        ParameterChecks().before_pipeline_run(
            run_params={}, pipeline=pipelines["__default__"], catalog=catalog
        )


def test_kedro_reports_a_bad_block_with_our_message_before_any_node():
    configure_project("weighted_lowrank")
    bad = {**conf_parameters(), "evaluation": {**conf_parameters()["evaluation"], "batch_size": 0}}
    with pytest.raises(Exception, match=r"evaluation\.batch_size=0: expected a positive int"):
        ParameterValidator(register_pipelines()).validate_raw_params(bad)


def test_fingerprint_round_trips_through_every_container():
    bundle = make_tiny_bundle()
    tensor_file = {"tensors": {"w": torch.ones(2)}, "metadata": {"mode": "x"}}
    for data in (bundle, tensor_file, pd.DataFrame({"a": [1, 2]}), {"metrics": {}}):
        assert fingerprint_of(data) is None
        stamped = with_fingerprint(data, "abc")
        assert fingerprint_of(stamped) == "abc"
    assert with_fingerprint(tensor_file, "abc")["metadata"]["mode"] == "x"
    with pytest.raises(ValueError, match="mixes rows"):
        fingerprint_of(pd.DataFrame({FINGERPRINT_KEY: ["a", "b"]}))


def test_lineage_check_passes_agreeing_and_unstamped_inputs():
    node = Node(_identity, ["fine_tuned_model", "fisher_information", "test_split"], "out")
    inputs = {
        "fine_tuned_model": with_fingerprint(make_tiny_bundle(), "abc"),
        "fisher_information": {"tensors": {}, "metadata": {FINGERPRINT_KEY: "abc"}},
        "test_split": pd.DataFrame({"text": ["a"], "label": [0]}),
    }
    assert LineageCheck().before_node_run(node=node, catalog=DataCatalog(), inputs=inputs) is None


def test_lineage_check_names_datasets_versions_and_the_pin_that_fixes_it(tmp_path):
    bundle = make_tiny_bundle()
    fingerprint = model_fingerprint(bundle.model)
    model_set = HFModelDataset(
        str(tmp_path / "model"), version=Version(None, "2026-01-01T00.00.00.000Z")
    )
    model_set.save(with_fingerprint(bundle, fingerprint))
    fisher_path = str(tmp_path / "fisher.safetensors")
    tensors = {"w": torch.ones(3)}
    for version, stamp in (
        ("2026-01-01T00.00.00.000Z", fingerprint),
        ("2026-02-01T00.00.00.000Z", "0" * 16),
    ):
        SafetensorsDataset(fisher_path, version=Version(None, version)).save(
            {"tensors": tensors, "metadata": {FINGERPRINT_KEY: stamp}}
        )
    catalog = DataCatalog(
        {
            "fine_tuned_model": HFModelDataset(
                str(tmp_path / "model"), version=Version(None, None)
            ),
            "fisher_information": SafetensorsDataset(fisher_path, version=Version(None, None)),
        }
    )
    inputs = {name: catalog.load(name) for name in ("fine_tuned_model", "fisher_information")}
    node = Node(_identity, list(inputs), "out", name="compress")
    with pytest.raises(ValueError) as raised:
        LineageCheck().before_node_run(node=node, catalog=catalog, inputs=inputs)
    message = str(raised.value)
    assert "node 'compress'" in message
    assert (
        f"fine_tuned_model (version 2026-01-01T00.00.00.000Z) comes from model {fingerprint}"
        in message
    )
    assert "fisher_information (version 2026-02-01T00.00.00.000Z) comes from model 0000" in message
    assert "--load-versions=fisher_information:2026-01-01T00.00.00.000Z" in message


def _parameters_catalog(damping: float, budget: float = 0.5) -> DataCatalog:
    parameters = {
        "compression": {"budget": budget, "allocation": "uniform", "targets": "all"},
        "kfwsvd": {"options": {"damping": damping}},
    }
    return DataCatalog({"parameters": MemoryDataset(parameters)})


def test_loss_curves_made_under_other_solver_options_are_refused_naming_keys_and_the_remake(
    tmp_path,
):
    """A ``--from-nodes svd_reference`` run after a changed kfwsvd damping must not reuse the
    curves the old damping made; a changed budget, which the curves do not depend on, may."""
    from kedro_datasets.pandas import ParquetDataset

    from weighted_lowrank.pipelines.factorization import create_pipeline

    (curves_node,) = create_pipeline().only_nodes("kfwsvd.loss_curves").nodes
    inputs = {
        "params:compression": {"budget": 0.5, "allocation": "uniform", "targets": "all"},
        "params:kfwsvd.options": {"damping": 0.01},
    }
    outputs = {"kfwsvd.loss_curves": pd.DataFrame({"module": ["a"], "predicted_loss": [1.0]})}
    LineageCheck().after_node_run(node=curves_node, inputs=inputs, outputs=outputs)
    stored = ParquetDataset(filepath=str(tmp_path / "loss_curves.parquet"))
    stored.save(outputs["kfwsvd.loss_curves"])
    reloaded = {"kfwsvd.loss_curves": stored.load()}
    allocate = Node(_identity, ["kfwsvd.loss_curves"], "kfwsvd.rank_map", name="kfwsvd.allocate")

    # A later run at another budget may reuse them, one with another damping may not.
    later = _parameters_catalog(damping=0.01, budget=0.3)
    LineageCheck().before_node_run(node=allocate, catalog=later, inputs=reloaded)
    with pytest.raises(ValueError) as raised:
        LineageCheck().before_node_run(
            node=allocate, catalog=_parameters_catalog(damping=0.1), inputs=reloaded
        )
    message = str(raised.value)
    assert "kfwsvd.loss_curves was made by node 'kfwsvd.loss_curves'" in message
    assert "kfwsvd.options.damping: 0.01 when made, 0.1 now" in message
    assert "compression.budget" not in message
    assert "--from-nodes=kfwsvd.loss_curves" in message
