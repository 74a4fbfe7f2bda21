"""Subset runs as a new user types them: the upstream pipelines first, then one solver's
factorization and evaluation (``--namespaces``) from what they persisted; later runs that start
after a node whose parameters changed are refused."""

from __future__ import annotations

import pytest

from tests.test_session import copy_project
from tests.test_session import kedro_run as session_run


def kedro_run(project, model_dir, pipelines: list[str], params=None, **options) -> None:
    """``kedro run --env smoke --pipelines <pipelines> [--params ...] [--namespaces ...]``."""
    runtime_params = {
        "mlflow_tracking_uri": f"sqlite:///{project / 'mlflow.db'}",
        "model": {"source": str(model_dir)},
        **(params or {}),
    }
    session_run(project, pipelines, runtime_params, **options)


def test_one_solver_runs_after_only_the_upstream_pipelines(tmp_path):
    model_dir = copy_project(tmp_path)
    kedro_run(tmp_path, model_dir, ["data_processing", "fine_tuning", "fisher_estimation"])
    data = tmp_path / "data"
    # The SVD reference every namespace reads is made beside the Fisher it weighs.
    assert (data / "04_feature" / "svd_reference_loss.parquet").is_file()
    kedro_run(
        tmp_path,
        model_dir,
        ["factorization", "evaluation"],
        namespaces=["dense", "kfwsvd"],
    )
    assert (data / "08_reporting" / "evaluation" / "kfwsvd.json").is_file()
    assert (data / "08_reporting" / "evaluation" / "dense.json").is_file()
    assert not (data / "07_model_output" / "svd").exists()  # only the named namespaces ran

    # A later budget reuses the curves (they do not depend on it) ...
    remake = ["svd_reference", "kfwsvd.allocate", "kfwsvd.compress"]
    kedro_run(
        tmp_path, model_dir, ["factorization"], {"compression": {"budget": 0.2}}, node_names=remake
    )
    # ... other solver options do not: the curves are refused, naming the key and the remake.
    damped = {"kfwsvd": {"options": {"damping": 0.001}}}
    with pytest.raises(ValueError) as raised:
        kedro_run(tmp_path, model_dir, ["factorization"], damped, node_names=remake)
    message = str(raised.value)
    assert "kfwsvd.loss_curves was made by node 'kfwsvd.loss_curves'" in message
    assert "kfwsvd.options.damping: unset when made, 0.001 now" in message
    assert "--from-nodes=kfwsvd.loss_curves" in message
