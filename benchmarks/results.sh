#!/usr/bin/env bash
# Regenerates docs/RESULTS.md on the embedded default (≈ 50 min on 2 CPU cores): one full run at
# the default budget 0.5 with fine-tuning after compression (pipeline `refined`), the per-layer
# risk validation on that run's models, the same solvers (same fine-tuned model and Fisher) at
# budgets 0.3 and 0.7 (`refined` from the factorization's svd_reference node on, as in the README's
# budget sweep), then the tables from the MLflow store. Run from the project root after the
# README's install.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 KEDRO_DISABLE_TELEMETRY=1
kedro=.venv/bin/kedro
# The tables are of the uniform allocation (the default is global since issue 23).
uniform=compression.allocation=uniform
$kedro run --pipelines refined --params "$uniform"
$kedro run --pipelines risk_validation --params "$uniform,risk_validation.curvature=true"
for budget in 0.3 0.7; do
  $kedro run --pipelines refined --from-nodes svd_reference --params "$uniform,compression.budget=$budget"
done
.venv/bin/python benchmarks/results.py
