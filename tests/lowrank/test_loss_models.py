"""Loss models: each quadratic against vec(ΔW)ᵀ F vec(ΔW) with the explicit matrix F."""

from __future__ import annotations

import pytest
import torch

from weighted_lowrank.lowrank.loss_models import (
    LOSS_MODELS,
    LayerCurvature,
    predicted_loss_increase,
)

OUT, IN = 5, 4


def _spd(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random symmetric positive semi-definite matrix of rank ``size − 1`` (singular on purpose)."""
    root = torch.randn(size, size - 1, generator=generator, dtype=torch.float64)
    return root @ root.T


@pytest.fixture
def problem() -> tuple[torch.Tensor, LayerCurvature]:
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(OUT, IN, generator=generator, dtype=torch.float64)
    curvature = LayerCurvature(
        fisher=torch.rand(OUT, IN, generator=generator, dtype=torch.float64) ** 3,
        input_moment=_spd(IN, generator),
        output_moment=_spd(OUT, generator),
    )
    return delta, curvature


def explicit_curvature(loss_model: str, curvature: LayerCurvature) -> torch.Tensor:
    """The (out·in × out·in) matrix F of ``loss_model``, built entry by entry where it is diagonal."""
    fisher, a, g = curvature.fisher, curvature.input_moment, curvature.output_moment
    if loss_model == "identity":
        return fisher.mean() * torch.eye(OUT * IN, dtype=torch.float64)
    if loss_model == "fwsvd":
        rank_one = torch.empty(OUT, IN, dtype=torch.float64)
        for i in range(OUT):
            for j in range(IN):
                rank_one[i, j] = fisher[i, :].sum() * fisher[:, j].sum() / fisher.sum()
        return torch.diag(rank_one.flatten())
    if loss_model == "diagonal":
        return torch.diag(fisher.flatten())
    if loss_model == "kronecker":
        return torch.kron(g, a)
    if loss_model == "activation":
        return torch.kron(torch.trace(g) / OUT * torch.eye(OUT, dtype=torch.float64), a)
    raise AssertionError(loss_model)


@pytest.mark.parametrize("loss_model", LOSS_MODELS)
def test_each_quadratic_equals_the_explicit_matrix_form(problem, loss_model) -> None:
    delta, curvature = problem
    vec = delta.flatten()  # row-major, as torch.kron(G, A) indexes (i, j) ↦ i·in + j
    expected = 0.5 * float(vec @ explicit_curvature(loss_model, curvature) @ vec)
    predicted = predicted_loss_increase(delta, curvature, [loss_model])
    assert predicted == {loss_model: pytest.approx(expected, rel=1e-12)}
    assert expected > 0


def test_every_loss_model_in_one_call_and_float32_inputs(problem) -> None:
    delta, curvature = problem
    single = LayerCurvature(*(tensor.float() for tensor in vars(curvature).values()))
    predicted = predicted_loss_increase(delta.float(), single)
    assert list(predicted) == list(LOSS_MODELS)
    for model, value in predicted.items():
        exact = predicted_loss_increase(delta, curvature, [model])[model]
        assert value == pytest.approx(exact, rel=1e-5), model


def test_fwsvd_equals_the_diagonal_model_when_the_fisher_is_exactly_rank_one() -> None:
    generator = torch.Generator().manual_seed(1)
    rows = torch.rand(OUT, generator=generator, dtype=torch.float64) + 0.1
    columns = torch.rand(IN, generator=generator, dtype=torch.float64) + 0.1
    delta = torch.randn(OUT, IN, generator=generator, dtype=torch.float64)
    curvature = LayerCurvature(fisher=torch.outer(rows, columns))
    predicted = predicted_loss_increase(delta, curvature, ["fwsvd", "diagonal"])
    assert predicted["fwsvd"] == pytest.approx(predicted["diagonal"], rel=1e-12)
    # A Fisher that is not rank one tells them apart.
    skewed = LayerCurvature(fisher=curvature.fisher + torch.eye(OUT, IN, dtype=torch.float64))
    other = predicted_loss_increase(delta, skewed, ["fwsvd", "diagonal"])
    assert other["fwsvd"] != pytest.approx(other["diagonal"], rel=1e-3)


def test_the_scales_make_the_simplified_models_exact_in_their_special_cases(problem) -> None:
    """identity = diagonal for a uniform Fisher; activation = kronecker for an isotropic G."""
    delta, curvature = problem
    uniform = LayerCurvature(fisher=torch.full((OUT, IN), 0.3, dtype=torch.float64))
    predicted = predicted_loss_increase(delta, uniform)
    assert predicted["identity"] == pytest.approx(predicted["diagonal"], rel=1e-12)
    isotropic = LayerCurvature(
        input_moment=curvature.input_moment,
        output_moment=2.5 * torch.eye(OUT, dtype=torch.float64),
    )
    predicted = predicted_loss_increase(delta, isotropic)
    assert predicted["activation"] == pytest.approx(predicted["kronecker"], rel=1e-12)


def test_zero_fisher_and_zero_change_predict_no_loss(problem) -> None:
    delta, curvature = problem
    zero = LayerCurvature(fisher=torch.zeros(OUT, IN, dtype=torch.float64))
    assert set(predicted_loss_increase(delta, zero).values()) == {0.0}
    assert set(predicted_loss_increase(torch.zeros_like(delta), curvature).values()) == {0.0}


def test_missing_statistics_are_skipped_by_default_and_named_when_requested(problem) -> None:
    delta, curvature = problem
    fisher_only = LayerCurvature(fisher=curvature.fisher)
    assert fisher_only.loss_models() == ("identity", "fwsvd", "diagonal")
    assert fisher_only.missing("kronecker") == ("input_moment", "output_moment")
    assert list(predicted_loss_increase(delta, fisher_only)) == ["identity", "fwsvd", "diagonal"]
    moments_only = LayerCurvature(input_moment=curvature.input_moment)
    assert moments_only.loss_models() == ()
    with pytest.raises(ValueError, match=r"activation needs \['output_moment'\]"):
        predicted_loss_increase(delta, moments_only, ["activation"])
    with pytest.raises(ValueError, match=r"unknown loss model 'hessian'; expected one of"):
        predicted_loss_increase(delta, curvature, ["hessian"])


def test_statistics_of_the_wrong_shape_are_rejected(problem) -> None:
    delta, curvature = problem
    transposed = LayerCurvature(
        input_moment=curvature.output_moment, output_moment=curvature.input_moment
    )
    with pytest.raises(ValueError, match=r"input_moment has shape \(5, 5\); .* expected \(4, 4\)"):
        predicted_loss_increase(delta, transposed)
    with pytest.raises(ValueError, match="ΔW must be 2-D"):
        predicted_loss_increase(delta.flatten(), curvature)
