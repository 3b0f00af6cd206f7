#!/usr/bin/env bash
# The GPU grid of benchmarks/transfer.py (issue 9, item 4), one size per command so that each stays within a
# 10-minute run; full-size EDEN and Matrix-Game-2 with seeded random weights (the arithmetic of the real models).
#   OUT=out/transfer RUNS=3 FRAMES=48 benchmarks/transfer_gpu.sh [352x640 480x832 1088x1920 mg2]
# Writes $OUT/<size>.json, $OUT/<size>.png and $OUT/<size>.txt (the table); `mg2` the cond_concat comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/transfer}
RUNS=${RUNS:-3}
FRAMES=${FRAMES:-48}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for what in "${@:-352x640 480x832 1088x1920 mg2}"; do
  for item in $what; do
    if [ "$item" = mg2 ]; then
      "$PY" benchmarks/transfer.py --mg2 --mg2-config mg2/universal --set init_seed=0 --blocks 50 \
        --json "$OUT/mg2.json" --log-dir "$OUT/logs" | tee "$OUT/mg2.txt"
    else
      "$PY" benchmarks/transfer.py --config eden/interpolate --set init_seed=0 --sizes "$item" --frames "$FRAMES" \
        --runs "$RUNS" --json "$OUT/$item.json" --plot "$OUT/$item.png" --log-dir "$OUT/logs" | tee "$OUT/$item.txt"
    fi
  done
done
