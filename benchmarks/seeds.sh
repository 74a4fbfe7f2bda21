#!/usr/bin/env bash
# The seed sweep behind docs/RESULTS.md's "Across seeds" section: the default run (no refinement)
# for seeds 0, 1 and 2 at budgets 0.5 and 0.3 — one MLflow parent run per seed and budget in
# its own store, seeds.db — then the mean ± sd over seeds and the differences to fwsvd paired by
# seed, written between the `seeds` markers of docs/RESULTS.md. ≈ 45 min on 2 CPU cores. Run from
# the project root after the README's install.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 KEDRO_DISABLE_TELEMETRY=1
store="sqlite:///$PWD/seeds.db"
.venv/bin/python -m weighted_lowrank.analysis.sweep run --seeds 0 1 2 --budgets 0.5 0.3 --tracking-uri "$store"
.venv/bin/python - "$store" <<'PY'
import sys
from pathlib import Path

from benchmarks.doc_sections import write_section

from weighted_lowrank.analysis.sweep import sweep_report

write_section(Path("docs/RESULTS.md"), "seeds", sweep_report(sys.argv[1]), "benchmarks/seeds.sh")
PY
