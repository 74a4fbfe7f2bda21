"""Paired comparison of two models scored on the same examples (plain numpy / SciPy).

A classifier's examples are compared by right / wrong: ``wins`` = only A right, ``losses`` =
only the reference B right; exact McNemar p; accuracy difference with its paired bootstrap
interval, resampled as Multinomial counts of wins, losses and ties (the same distribution as
resampled indices, at a cost independent of n). A causal language model's token blocks are
compared by their next-token loss: a sign test, and the token-weighted loss difference with a
bootstrap over blocks. The maths and its tests: docs/METHOD.md, "Reporting: child runs, paired
tests, comparison".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Confidence level of the bootstrap interval.
CONFIDENCE = 0.95
#: Every row of a comparison is tested against these rows (when they are among the rows).
REFERENCES = ("fwsvd", "svd")


@dataclass(frozen=True)
class PairedComparison:
    """Model A against reference B on the same ``n`` examples (see the module docstring)."""

    n: int
    wins: int
    losses: int
    p_value: float
    diff: float
    ci_low: float
    ci_high: float

    @property
    def disagreements(self) -> int:
        return self.wins + self.losses

    def statistics(self) -> dict[str, float]:
        """The reported values by name (see :data:`STATISTICS`)."""
        return {name: getattr(self, "p_value" if name == "p" else name) for name in STATISTICS}


#: The names :meth:`PairedComparison.statistics` reports, in order.
STATISTICS = ("disagreements", "wins", "losses", "p", "diff", "ci_low", "ci_high")


def discordant_counts(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int]:
    """(wins, losses) of A over B: examples only A gets right, examples only B gets right."""
    a, b = _as_outcomes(correct_a, correct_b)
    return int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value of ``wins`` against ``losses`` discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * stats.binom.cdf(min(wins, losses), n, 0.5)))


def bootstrap_diff_interval(
    wins: int,
    losses: int,
    n: int,
    resamples: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of acc(A) − acc(B) over ``resamples`` paired bootstrap resamples of
    ``n`` examples of which ``wins`` only A and ``losses`` only B got right."""
    generator = np.random.default_rng(seed)
    shares = np.array([wins, losses, n - wins - losses], dtype=np.float64) / n
    counts = generator.multinomial(n, shares, size=resamples)
    return _interval((counts[:, 0] - counts[:, 1]) / n, confidence)


def _interval(diffs: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of the resampled differences."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_comparison(
    correct_a: np.ndarray, correct_b: np.ndarray, resamples: int, seed: int
) -> PairedComparison:
    """McNemar test and bootstrap interval of model A against reference B (per-example
    correctness, same examples in the same order)."""
    wins, losses = discordant_counts(correct_a, correct_b)
    n = len(correct_a)
    interval = bootstrap_diff_interval(wins, losses, n, resamples, seed)
    return _compared(n, wins, losses, (wins - losses) / n, interval)


def paired_loss_comparison(
    loss_a: np.ndarray,
    loss_b: np.ndarray,
    tokens: np.ndarray,
    resamples: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> PairedComparison:
    """Sign test and bootstrap interval of language model A against reference B from the mean
    next-token loss of each block (same blocks in the same order, checked by the caller,
    ``tokens`` predicted in each)."""
    a, b = np.asarray(loss_a, dtype=np.float64), np.asarray(loss_b, dtype=np.float64)
    weights = np.asarray(tokens, dtype=np.float64)
    wins, losses = int(np.count_nonzero(a < b)), int(np.count_nonzero(a > b))
    weighted = (a - b) * weights
    generator = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    chunk = max(1, 4_000_000 // len(a))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = generator.integers(0, len(a), size=(count, len(a)))
        diffs[start : start + count] = weighted[index].sum(axis=1) / weights[index].sum(axis=1)
    diff = float(weighted.sum() / weights.sum())
    return _compared(len(a), wins, losses, diff, _interval(diffs, confidence))


def _compared(
    n: int, wins: int, losses: int, diff: float, interval: tuple[float, float]
) -> PairedComparison:
    """The comparison with its exact two-sided binomial p of the wins among the discordant pairs."""
    return PairedComparison(n, wins, losses, mcnemar_exact_p(wins, losses), diff, *interval)


def _as_outcomes(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(
            f"paired outcomes must be two non-empty vectors of one length; got {a.shape}, {b.shape}"
        )
    return a, b
