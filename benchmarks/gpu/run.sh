#!/usr/bin/env bash
# The GPU check, in at most 8 minutes on one GPU (written for an H100/H200 machine; nothing here runs on CPU):
#   1. the engine's per-step cost of Wan2.1 14B and 1.3B at real shapes (random weights, bf16) -> real_shapes.json
#   2. the serving comparison (large-only / colocated SR / disaggregated SR) on srd-tiny on the GPU -> serving.json
#   3. a report of both -> REPORT.md
# Everything goes under benchmarks/results/gpu/<device name>/, and the device is named in each JSON.
#
#   benchmarks/gpu/run.sh          # PY=... to use another interpreter; MODEL=... for another small model
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
DEVICE="$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())')"
OUT="benchmarks/results/gpu/$(echo "$DEVICE" | tr -c 'A-Za-z0-9.\n-' '_')"
mkdir -p "$OUT"
echo "device: $DEVICE -> $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
MODEL_ARGS=()
if [ -n "${MODEL:-}" ]; then MODEL_ARGS=(--model "$MODEL"); fi

began=$SECONDS
# About 2 minutes on an H100: two CFG steps per model and backend after a warm-up, at 832x480x81.
timeout 200 "$PY" benchmarks/gpu/real_shapes.py --repeats 2 --out "$OUT/real_shapes.json"
echo "real shapes: $((SECONDS - began)) s"

# The tiny model's steps take milliseconds on a GPU, so requests are many and phases short; the comparison is
# bounded by --time-budget (phases left when it runs out are listed under "skipped").
began=$SECONDS
timeout 260 "$PY" benchmarks/serving_compare.py "${MODEL_ARGS[@]}" --device cuda --no-pin --workers 2 \
    --repeats 1 --unloaded-count 4 --concurrency 8 --saturation-count 48 --levels 0.5,0.8 --level-count 40 \
    --phase-limit 45 --time-budget 190 --out "$OUT/serving.json"
echo "serving comparison: $((SECONDS - began)) s"

"$PY" benchmarks/report.py --results "$OUT"
echo "wrote $OUT"
