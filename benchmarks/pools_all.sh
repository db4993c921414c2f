#!/usr/bin/env bash
# Issue 13 point 6 in one command: the simulated-pool benchmarks, then REPORT.md ("Simulated pools").
#
#   benchmarks/pools_all.sh            (~60 min on the 2-core CPU machine; POOLS_QUICK=1: ~25 min, sizes 8,16)
#
# Writes under benchmarks/results/: pools_sim.json (equal GPUs, controller off), pools_sim_slo.json (the same
# setups deployed with the SLO controller on, warmed up, then the 80% level; saturation and the controller's
# target taken from pools_sim.json), fleets.json
# (mixed fleets: planner over the cost table, two fleets simulated), load_step.json + load_step.png, REPORT.md.
# Run it on an otherwise idle machine: the simulated replicas sleep, but the control plane's real CPU is amplified
# by 1 / time factor in simulated time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-benchmarks/results}"
SIZES=8,16,24
if [ -n "${POOLS_QUICK:-}" ]; then SIZES=8,16; fi
"$PY" benchmarks/pools_sim.py --sizes "$SIZES" --out "$OUT/pools_sim.json"
"$PY" benchmarks/pools_sim.py --sizes "$SIZES" --setups colocated-sr,disaggregated-sr --levels 0.8 \
    --slo-factor 1.5 --saturation-from "$OUT/pools_sim.json" --out "$OUT/pools_sim_slo.json"
"$PY" benchmarks/fleets.py --out "$OUT/fleets.json"
"$PY" benchmarks/load_step.py --out "$OUT/load_step.json" --plot "$OUT/load_step.png"
"$PY" benchmarks/sim_memory.py --out "$OUT/sim_memory.json"
"$PY" benchmarks/report.py --results "$OUT"
