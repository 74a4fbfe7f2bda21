"""Plain-torch numerical core: weighted low-rank objective, solvers, Fisher, risk, model surgery.

No Kedro import anywhere below this package, and nothing from the rest of ``weighted_lowrank``,
so it is usable from a notebook or another project.
"""

from weighted_lowrank.lowrank.architectures import (
    default_target_names,
    linearize_conv1d,
    save_pretrained_model,
    transformer_blocks,
)
from weighted_lowrank.lowrank.calibration import CALIBRATION_STATISTICS, statistic_key
from weighted_lowrank.lowrank.compression import (
    apply_factors,
    compress_model,
    factorize_model,
    layer_ranks,
    svd_reference_losses,
)
from weighted_lowrank.lowrank.fisher import Calibration, calibrate, empirical_fisher
from weighted_lowrank.lowrank.layer import LowRankLinear, lowrank_modules, replace_module
from weighted_lowrank.lowrank.objective import FactorizationResult, rank_for_budget, weighted_loss
from weighted_lowrank.lowrank.risk import fisher_variance, spearman
from weighted_lowrank.lowrank.serialization import (
    LayerSpec,
    LowRankConfig,
    load_compressed,
    save_compressed,
)
from weighted_lowrank.lowrank.solvers import (
    SOLVERS,
    factorize,
    factorize_batch,
    register_solver,
    solver_needs,
)
from weighted_lowrank.lowrank.targets import select_linear_modules

__all__ = [
    "Calibration",
    "CALIBRATION_STATISTICS",
    "SOLVERS",
    "FactorizationResult",
    "LayerSpec",
    "LowRankConfig",
    "LowRankLinear",
    "apply_factors",
    "calibrate",
    "compress_model",
    "default_target_names",
    "empirical_fisher",
    "factorize",
    "factorize_batch",
    "factorize_model",
    "fisher_variance",
    "layer_ranks",
    "linearize_conv1d",
    "load_compressed",
    "lowrank_modules",
    "rank_for_budget",
    "register_solver",
    "replace_module",
    "save_compressed",
    "save_pretrained_model",
    "select_linear_modules",
    "solver_needs",
    "spearman",
    "statistic_key",
    "svd_reference_losses",
    "transformer_blocks",
    "weighted_loss",
]
