#!/usr/bin/env bash
# The GPU check, in at most 10 minutes on one GPU (written for an H100/H200 machine; nothing here runs on CPU):
#   1. the engine's per-step cost of Wan2.1 14B and 1.3B at real shapes (random weights, bf16) -> real_shapes.json
#   2. the serving comparison (large-only / colocated SR / disaggregated SR) on srd-tiny on the GPU -> serving.json
#   3. the app on the GPU with the NVML sampler on, its GPU series scraped once (and the dashboard's GPU panels
#      evaluated where `prometheus` is installed) -> observability.json; a missing series fails the run
#   4. a report of 1 and 2 -> REPORT.md
# Everything goes under benchmarks/results/gpu/<device name>/, and the device is named in each JSON.
#
#   benchmarks/gpu/run.sh          # PY=... to use another interpreter; MODEL=... for another small model
#   STEPS=observability benchmarks/gpu/run.sh    # only some steps (default: real_shapes serving observability)
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
STEPS=" ${STEPS:-real_shapes serving observability} "
status=0

if [[ "$STEPS" == *" real_shapes "* ]]; then
  began=$SECONDS
  # About 2 minutes on an H100: two CFG steps per model and backend after a warm-up, at 832x480x81.
  timeout 200 "$PY" benchmarks/gpu/real_shapes.py --repeats 2 --out "$OUT/real_shapes.json"
  echo "real shapes: $((SECONDS - began)) s"
fi

if [[ "$STEPS" == *" serving "* ]]; then
  # The tiny model's steps take milliseconds on a GPU, so requests are many and phases short; the comparison is
  # bounded by --time-budget (phases left when it runs out are listed under "skipped").
  began=$SECONDS
  timeout 260 "$PY" benchmarks/serving_compare.py "${MODEL_ARGS[@]}" --device cuda --no-pin --workers 2 \
      --repeats 1 --unloaded-count 4 --concurrency 8 --saturation-count 48 --levels 0.5,0.8 --level-count 40 \
      --phase-limit 45 --time-budget 190 --out "$OUT/serving.json"
  echo "serving comparison: $((SECONDS - began)) s"
fi

if [[ "$STEPS" == *" observability "* ]]; then
  # About a minute: `srserve serve` on cuda (cluster and five replicas), four small jobs, two sampler periods.
  began=$SECONDS
  if ! timeout 150 "$PY" benchmarks/gpu/observability.py --out "$OUT/observability.json"; then
    echo "observability: GPU series missing or the run failed (see $OUT/observability.json)"
    status=1
  fi
  echo "observability (GPU series): $((SECONDS - began)) s"
fi

if [ -f "$OUT/real_shapes.json" ] || [ -f "$OUT/serving.json" ]; then
  "$PY" benchmarks/report.py --results "$OUT"
fi
echo "wrote $OUT"
exit $status
