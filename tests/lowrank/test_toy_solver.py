"""A solver defined here, outside the package, registered and run like a built-in one: through
``factorize_batch`` and through one namespace of the factorization pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner

from tests.conftest import make_tiny_bundle
from tests.pipelines.conftest import (
    BUDGET,
    KeptDataset,
    factorization_catalog,
    make_fisher_information,
)
from weighted_lowrank.lowrank.solvers import (
    _REGISTRY,
    Options,
    Problem,
    SolverOutput,
    SolverSpec,
    check_solver_options,
    exact_outputs,
    factorize_batch,
    option,
    register_solver,
    solver_needs,
    solver_options,
)
from weighted_lowrank.lowrank.solvers._common import balanced_truncated_svd
from weighted_lowrank.lowrank.solvers.spectra import svd_spectrum
from weighted_lowrank.pipelines.factorization.pipeline import (
    SHARED_INPUTS,
    SHARED_PARAMETERS,
    create_reference_pipeline,
    create_solver_template,
)


@dataclass(frozen=True)
class ShrunkOptions(Options):
    """The toy's one option: how much of each kept singular value it keeps."""

    shrink: float = option(1.0, (lambda v: isinstance(v, float) and 0 < v <= 1, "in (0, 1]"))


def solve_shrunk(problem: Problem, options: ShrunkOptions, started: float) -> list[SolverOutput]:
    """Truncated SVD with every kept singular value multiplied by ``shrink``."""
    left, right = balanced_truncated_svd(problem.weight, problem.rank)
    return exact_outputs(problem, left * options.shrink, right, started)


TOY = SolverSpec(solve_shrunk, ShrunkOptions, svd_spectrum, "toy (svd spectrum)")


@pytest.fixture
def toy():
    register_solver("toy", TOY)
    yield "toy"
    del _REGISTRY["toy"]


def _layers(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]


@pytest.mark.parametrize("shrink", [1.0, 0.5])
def test_the_toy_runs_through_factorize_batch_with_its_own_option(toy, shrink):
    weights = _layers([(12, 9), (12, 9), (7, 10)])
    results = factorize_batch(weights, [None] * 3, [3, 3, 2], solver=toy, shrink=shrink)
    for weight, result in zip(weights, results, strict=True):
        singular = torch.linalg.svdvals(weight)
        kept, rank = singular[: result.rank], result.rank
        # Eckart–Young's tail, plus what shrinking the kept values costs.
        expected = singular[rank:].square().sum() + ((1 - shrink) * kept).square().sum()
        assert result.loss == pytest.approx(float(expected), rel=1e-10)
        assert result.solver == toy and result.stop_reason == "exact"
    assert solver_options(toy) == {"device": None, "seed": 0, "shrink": 1.0}
    assert solver_needs(toy) == ()


def test_the_toy_options_are_checked_by_the_registry(toy):
    with pytest.raises(ValueError, match=r"solver 'toy': shrink must be in \(0, 1\], got 2\.0"):
        check_solver_options(toy, {"shrink": 2.0})
    with pytest.raises(ValueError, match=r"solver 'toy' got unknown option\(s\) \['axis'\]"):
        check_solver_options(toy, {"axis": "in"})
    check_solver_options(toy, {"shrink": 0.25, "seed": 3})


def test_the_toy_runs_through_one_namespace_of_the_factorization_pipeline(toy):
    bundle = make_tiny_bundle(seed=1)
    fisher_information = make_fisher_information(bundle.model)
    reference = create_reference_pipeline()
    namespace = Pipeline(
        create_solver_template(toy),
        namespace=toy,
        inputs=SHARED_INPUTS,
        parameters=SHARED_PARAMETERS,
    )
    catalog: DataCatalog = factorization_catalog(bundle, fisher_information)
    catalog[f"params:{toy}.options"] = {"shrink": 0.5}
    for name in ("compressed_model", "layer_report", "convergence", "rank_map"):
        catalog[f"{toy}.{name}"] = KeptDataset(copy_mode="assign")
    SequentialRunner().run(reference + namespace, catalog)
    report = catalog.load(f"{toy}.layer_report")
    assert set(report["solver"]) == {toy} and set(report["stop_reason"]) == {"exact"}
    assert report["budget"].unique().tolist() == [BUDGET]
    # Halving every kept singular value costs more than plain SVD at the same ranks.
    assert (report["loss_rel_svd"] > 1).all()
    assert catalog.load(f"{toy}.rank_map")["solver"].unique().tolist() == [toy]
