"""Plain-torch numerical core: weighted low-rank objective, solvers, Fisher, risk, model surgery.

No Kedro import anywhere below this package, so it is usable from a notebook or another project.
"""

from weighted_lowrank.lowrank.fisher import empirical_fisher
from weighted_lowrank.lowrank.objective import FactorizationResult, rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.risk import fisher_variance
from weighted_lowrank.lowrank.solvers import SOLVERS, factorize, factorize_batch
from weighted_lowrank.lowrank.surgery import (
    LowRankLinear,
    compress_model,
    load_compressed,
    save_compressed,
)
from weighted_lowrank.lowrank.targets import DEFAULT_TARGETS, select_linear_modules

__all__ = [
    "DEFAULT_TARGETS",
    "SOLVERS",
    "FactorizationResult",
    "LowRankLinear",
    "compress_model",
    "empirical_fisher",
    "factorize",
    "factorize_batch",
    "fisher_variance",
    "load_compressed",
    "rank_for_budget",
    "save_compressed",
    "select_linear_modules",
    "weighted_loss",
]
