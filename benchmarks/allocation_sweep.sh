#!/usr/bin/env bash
# Issue 13's sweep behind docs/RESULTS.md's "Global rank allocation" section: the default run (no
# refinement, every solver) for seeds 0, 1 and 2 at budgets 0.5, 0.3, 0.2 and 0.7, each with the
# global and the uniform allocation, the curves priced by CURVE_LOSS_MODEL (kronecker, the
# default, or own) — one MLflow parent run per (seed, budget, allocation) in its own store,
# allocation_<CURVE_LOSS_MODEL>.db — then the mean ± sd over seeds, the differences to fwsvd and
# global − uniform paired by seed (exact McNemar per seed), written between the
# `allocation_<CURVE_LOSS_MODEL>` markers of docs/RESULTS.md. The first pair of a seed (its first
# budget, global) runs the whole pipeline, so every seed also shows
# `kedro run --params compression.allocation=global` end to end. Budgets and seeds can be
# narrowed: BUDGETS="0.3 0.2" SEEDS="0" bash benchmarks/allocation_sweep.sh. Both pricings side by
# side: benchmarks/allocation_pricing.py.
# ≈ 6 min per (seed, budget, allocation) on 2 CPU cores, plus fine-tuning per seed. Run from the
# project root after the README's install.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 KEDRO_DISABLE_TELEMETRY=1 OMP_WAIT_POLICY=PASSIVE
curve="${CURVE_LOSS_MODEL:-kronecker}"
store="sqlite:///$PWD/allocation_$curve.db"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
read -r -a budgets <<< "${BUDGETS:-0.5 0.3 0.2 0.7}"
.venv/bin/python -m weighted_lowrank.analysis.sweep run --seeds "${seeds[@]}" --budgets "${budgets[@]}" \
  --allocations global uniform --tracking-uri "$store" --params "compression.curve_loss_model=$curve"
.venv/bin/python - "$store" "$curve" <<'PY'
import sys
from pathlib import Path

from benchmarks.doc_sections import write_section

from weighted_lowrank.analysis.sweep import sweep_report

write_section(
    Path("docs/RESULTS.md"),
    f"allocation_{sys.argv[2]}",
    sweep_report(sys.argv[1]),
    "benchmarks/allocation_sweep.sh",
)
PY
