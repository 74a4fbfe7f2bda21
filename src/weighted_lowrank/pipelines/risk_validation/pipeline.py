"""``risk_validation``: one dense reference, one namespace per solver measuring its damage layer
by layer, one ``collect_damage`` into the tables the summaries, metrics and plots read. The
solver list lives in code (pipelines are built before parameters are read): only the wired
models load.
"""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from weighted_lowrank.lowrank import solvers as registry

from .loss_model_nodes import loss_model_metrics, plot_loss_models, summarize_loss_models
from .nodes import collect_damage, measure_damage, measure_dense_reference
from .statistic_nodes import (
    plot_risk_validation,
    risk_validation_metrics,
    summarize_risk_validation,
)

#: The φ comparison: SVD's damage, and the gain of the element-wise weighted solver over it.
REFERENCE, WEIGHTED = "svd", "tfwsvd"
#: One solver per loss model (identity, rank-one, diagonal, Kronecker, activation); cost ∝ number.
SOLVERS: tuple[str, ...] = ("svd", "fwsvd", WEIGHTED, "kfwsvd", "svd_llm")

#: What the dense reference and every solver's measurement read (the latter after its own model).
MEASURE_INPUTS = [
    "dense_reference",
    "fine_tuned_model",
    "validation_split",
    "layer_risk",
    "fisher_information",
    "calibration_statistics",
    "params:model",
    "params:risk_validation",
    "params:device",
]


def node(function, inputs, outputs, **names) -> Node:
    """A node named after ``function``, with the keyword arguments ``names`` bound."""
    bound = update_wrapper(partial(function, **names), function)
    return Node(bound, inputs, outputs, name=function.__name__)


def create_solver_template(solver: str) -> Pipeline:
    """The un-namespaced measurement of one solver's compressed model."""
    inputs = ["compressed_model", *MEASURE_INPUTS]
    measure = node(
        measure_damage, inputs, "layer_damage", solver=solver, mirror=solver == REFERENCE
    )
    return Pipeline([measure], tags=[solver])


def check_solvers(solvers: tuple[str, ...]) -> None:
    """Registered solvers, each once, the two of the φ comparison among them."""
    problems = {
        "unknown": [solver for solver in solvers if solver not in registry.SOLVERS],
        "repeated": sorted({solver for solver in solvers if solvers.count(solver) > 1}),
        "missing": [solver for solver in (REFERENCE, WEIGHTED) if solver not in solvers],
    }
    if any(problems.values()):
        raise ValueError(
            f"risk_validation solvers {list(solvers)}: "
            + ", ".join(f"{kind} {names}" for kind, names in problems.items() if names)
            + f"; expected distinct solvers of {list(registry.SOLVERS)} including {REFERENCE} "
            f"and {WEIGHTED} (the φ comparison measures {REFERENCE}'s damage and {WEIGHTED}'s "
            "gain over it)"
        )


def create_pipeline(solvers: tuple[str, ...] = SOLVERS, **kwargs) -> Pipeline:
    check_solvers(tuple(solvers))
    both = {"reference": REFERENCE, "weighted": WEIGHTED}
    damage = {solver: f"{solver}.layer_damage" for solver in solvers}
    table, summary = "risk_validation_table", "risk_validation_summary"
    losses, loss_summary = "loss_model_table", "loss_model_summary"
    nodes = [
        node(measure_dense_reference, MEASURE_INPUTS[1:], "dense_reference"),
        node(
            collect_damage,
            {"layer_risk": "layer_risk", "dense_reference": "dense_reference", **damage},
            [table, losses],
            **both,
        ),
        node(summarize_risk_validation, [table, "params:risk_validation"], summary, **both),
        node(risk_validation_metrics, summary, "risk_validation_metrics", reference=REFERENCE),
        node(plot_risk_validation, [table, summary], "risk_validation_plot", **both),
        node(summarize_loss_models, [losses, table], loss_summary, reference=REFERENCE),
        node(loss_model_metrics, loss_summary, "loss_model_metrics", reference=REFERENCE),
        node(plot_loss_models, [losses, loss_summary], "loss_model_plot"),
    ]
    measured = (
        Pipeline(
            create_solver_template(solver),
            namespace=solver,
            inputs={name for name in MEASURE_INPUTS if not name.startswith("params:")},
            parameters={name for name in MEASURE_INPUTS if name.startswith("params:")},
        )
        for solver in solvers
    )
    return Pipeline([*nodes, *measured], tags=["reporting"])
