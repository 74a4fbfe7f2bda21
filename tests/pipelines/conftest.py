"""Fixtures shared by the pipeline tests: a tiny BERT factorized once by every solver."""

from __future__ import annotations

import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from tests.conftest import make_tiny_bundle, typed_params
from weighted_lowrank.lowrank.fingerprint import model_fingerprint
from weighted_lowrank.lowrank.solvers import SOLVERS, solver_options
from weighted_lowrank.lowrank.targets import select_linear_modules
from weighted_lowrank.pipelines.factorization import create_pipeline

BUDGET = 0.4


def make_fisher_information(model, seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"{name}.weight": torch.rand(module.weight.shape, generator=generator) ** 4 + 1e-3
        for name, module in select_linear_modules(model).items()
    }
    return {
        "tensors": tensors,
        "metadata": {
            "mode": "test",
            "num_examples": "1",
            "model_fingerprint": model_fingerprint(model),
        },
    }


def make_calibration_statistics(model, seed: int = 4) -> dict:
    """Random positive definite moments A, G and positive |x| means for every targeted layer."""
    generator = torch.Generator().manual_seed(seed)

    def moment(size: int) -> torch.Tensor:
        factor = torch.randn(size, 2 * size, generator=generator)
        return factor @ factor.T / (2 * size)

    tensors = {}
    for name, module in select_linear_modules(model).items():
        tensors[f"{name}.input_moment"] = moment(module.in_features)
        tensors[f"{name}.output_moment"] = moment(module.out_features)
        tensors[f"{name}.input_abs_mean"] = (
            torch.rand(module.in_features, generator=generator) + 0.1
        )
    return {
        "tensors": tensors,
        "metadata": {"num_examples": "1", "model_fingerprint": model_fingerprint(model)},
    }


class KeptDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release: keeps intermediate outputs for the tests."""

    def _release(self) -> None:
        pass


def fast_options(solver: str) -> dict:
    """A few iterations only: the pipeline's wiring is under test, not the solvers' convergence."""
    return {"max_iters": 3} if "max_iters" in solver_options(solver) else {}


def factorization_catalog(
    bundle,
    fisher_information,
    budget: float = BUDGET,
    allocation: str = "uniform",
    curve_loss_model: str = "own",
) -> DataCatalog:
    catalog = DataCatalog(
        {
            "fine_tuned_model": MemoryDataset(bundle),
            "fisher_information": MemoryDataset(fisher_information),
            "calibration_statistics": MemoryDataset(make_calibration_statistics(bundle.model)),
            "params:compression": MemoryDataset(
                typed_params(
                    "compression",
                    budget=budget,
                    allocation=allocation,
                    curve_loss_model=curve_loss_model,
                    device="cpu",
                    seed=0,
                )
            ),
        }
    )
    for solver in SOLVERS:
        catalog[f"params:{solver}.options"] = fast_options(solver)
        for intermediate in ("loss_curves", "rank_map"):
            catalog[f"{solver}.{intermediate}"] = KeptDataset()
    catalog["svd_reference_loss"] = KeptDataset()
    return catalog


@pytest.fixture(scope="session")
def factorized():
    """Every solver run once on a tiny BERT; shared by the factorization, evaluation and
    risk-validation tests (datasets load as copies, so tests cannot disturb each other)."""
    bundle = make_tiny_bundle(seed=1)
    # A random head on random features predicts one class for every input; a larger head spreads
    # the predictions over both classes, so the evaluation tests' metrics are not trivial.
    with torch.no_grad():
        bundle.model.classifier.weight.mul_(40.0)
    fisher_information = make_fisher_information(bundle.model)
    catalog = factorization_catalog(bundle, fisher_information)
    SequentialRunner().run(create_pipeline(), catalog)
    return bundle, fisher_information, catalog
