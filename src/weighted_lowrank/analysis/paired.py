"""Paired comparison of two classifiers scored on the same examples (plain numpy / SciPy).

Two models evaluated on one test set are compared example by example. With ``a`` and ``b`` the
per-example correctness (right / wrong) of model A and of the reference B:

* ``wins`` = #{A right, B wrong}, ``losses`` = #{A wrong, B right}; their sum is the number of
  discordant pairs, ``disagreements``. Examples both get right or both get wrong say nothing
  about which model is better.
* **Exact McNemar test**: under H0 (both models equally accurate) each discordant pair is A's
  win with probability 1/2, so ``wins`` ~ Binomial(disagreements, 1/2). The two-sided p-value is
  the probability, under H0, of an outcome no more likely than the observed one:
  p = Σ_{k : P(k) ≤ P(wins)} P(k) — for this symmetric binomial, min(1, 2·P(X ≤ min(wins,
  losses))); p = 1 without disagreements. It equals ``scipy.stats.binomtest(wins,
  disagreements).pvalue``.
* **Accuracy difference** ``diff`` = acc(A) − acc(B) = (wins − losses) / n.
* **Paired bootstrap interval**: resample the n examples with replacement (each example keeps its
  pair of outcomes), recompute the accuracy difference, ``resamples`` times with a seeded
  generator; the 95 % interval is the 2.5th and 97.5th percentile of those differences
  (``numpy.quantile``, linear interpolation). A resample's difference depends only on how many
  wins, losses and ties it drew, and those counts are Multinomial(n; wins/n, losses/n,
  ties/n) — drawing the counts is the same bootstrap as drawing the indices, at a cost that does
  not grow with n.

A causal language model has no right/wrong per example; its examples (token blocks) are compared
by their next-token loss (:func:`paired_loss_comparison`): ``wins`` = blocks where A's loss is
lower, ``losses`` = where it is higher, p the same exact two-sided binomial (sign) test of the wins
among the blocks that differ, ``diff`` = A's test loss minus B's (token-weighted mean next-token
loss, i.e. the log of the perplexity ratio), its interval the percentiles of that difference over
paired bootstrap resamples of the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Confidence level of the bootstrap interval.
CONFIDENCE = 0.95


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
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative; got wins={wins}, losses={losses}")
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
    if n < 1 or wins + losses > n or min(wins, losses) < 0:
        raise ValueError(f"need 0 ≤ wins + losses ≤ n, n ≥ 1; got {wins}, {losses}, {n}")
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
    low, high = bootstrap_diff_interval(wins, losses, n, resamples, seed)
    return PairedComparison(
        n=n,
        wins=wins,
        losses=losses,
        p_value=mcnemar_exact_p(wins, losses),
        diff=(wins - losses) / n,
        ci_low=low,
        ci_high=high,
    )


def paired_loss_comparison(
    loss_a: np.ndarray,
    loss_b: np.ndarray,
    tokens: np.ndarray,
    resamples: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> PairedComparison:
    """Sign test and bootstrap interval of language model A against reference B from the mean
    next-token loss of each block (same blocks in the same order, ``tokens`` predicted in each);
    see the module docstring."""
    a, b = np.asarray(loss_a, dtype=np.float64), np.asarray(loss_b, dtype=np.float64)
    weights = np.asarray(tokens, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.shape != weights.shape or len(a) == 0:
        raise ValueError(
            f"paired losses must be three non-empty vectors of one length; got {a.shape}, "
            f"{b.shape}, {weights.shape}"
        )
    if not weights.sum() > 0:
        raise ValueError("paired losses need at least one predicted token")
    wins, losses = int(np.count_nonzero(a < b)), int(np.count_nonzero(a > b))
    weighted = (a - b) * weights
    generator = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    chunk = max(1, 4_000_000 // len(a))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = generator.integers(0, len(a), size=(count, len(a)))
        diffs[start : start + count] = weighted[index].sum(axis=1) / weights[index].sum(axis=1)
    low, high = _interval(diffs, confidence)
    return PairedComparison(
        n=len(a),
        wins=wins,
        losses=losses,
        p_value=mcnemar_exact_p(wins, losses),
        diff=float(weighted.sum() / weights.sum()),
        ci_low=low,
        ci_high=high,
    )


def _as_outcomes(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(
            f"paired outcomes must be two non-empty vectors of one length; got {a.shape}, {b.shape}"
        )
    return a, b
