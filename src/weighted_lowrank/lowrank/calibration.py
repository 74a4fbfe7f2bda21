"""Calibration statistics of a targeted Linear layer, beyond the diagonal Fisher.

Names and normalisation shared by the pass that accumulates them (``fisher_estimation``) and the
solvers that use them. For a Linear layer ``y = W x`` seen on ``N`` examples with ``T`` real
(non-padding) tokens in all:

- ``input_moment``   A = (1/T) Σ_tokens x xᵀ          (in × in), the mean input second moment;
- ``output_moment``  G = (1/N) Σ_n Σ_t g_nt g_ntᵀ     (out × out), g_nt = ∂ℓ_n/∂y at token t;
- ``input_abs_mean`` (1/T) Σ_tokens |x|                (in,), ASVD's activation scale.

With this normalisation ``½ tr(ΔWᵀ G ΔW A)`` is the Kronecker-factored (K-FAC, "expand" over
tokens) estimate of the task-loss increase in nats *per example*, comparable across layers, and
``G_ii A_jj`` approximates the diagonal empirical Fisher divided by ``N``.
Stored as ``"<module>.<statistic>"`` float32 tensors.
"""

from __future__ import annotations

#: Every calibration statistic, in storage order.
CALIBRATION_STATISTICS: tuple[str, ...] = ("input_moment", "output_moment", "input_abs_mean")


def statistic_key(module: str, statistic: str) -> str:
    """The storage key of ``statistic`` of ``module``: ``"<module>.<statistic>"``."""
    if statistic not in CALIBRATION_STATISTICS:
        raise ValueError(
            f"unknown calibration statistic {statistic!r}; expected one of {CALIBRATION_STATISTICS}"
        )
    return f"{module}.{statistic}"
