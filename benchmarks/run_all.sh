#!/usr/bin/env bash
# Every benchmark and the report, in one command (~28 min on the 2-core CPU machine with the current srd-tiny, plus
# fairness ~25 min at 2 repeats and faults ~4 min;
# single request 26 s, quality 457 s, serving 1181 s at its default 3 repeats; SERVING_ARGS="--repeats 1": ~7 min):
#
#   benchmarks/run_all.sh
#
# Environment: MODEL (default: the bundled srd-tiny), OUT (default: benchmarks/results), QUALITY_VIDEOS (64),
# CACHE_VIDEOS (32), CPU_REPEATS (3), FAIRNESS_REPEATS (2; ~12 min each), SERVING_ARGS (extra flags for
# serving_compare.py, e.g. "--repeats 1").
# Writes under benchmarks/results/: sr_speedup.json, quality.json, hop_bytes.json, control_plane_cpu.json,
# control_plane_cpu_serve_mode.json,
# cache_compare.json, serving.json (+ serving_records.jsonl, every request with its job record), fairness.json/.md,
# faults.json/.md, run_all.json
# (wall time of each step), REPORT.md and its PNG plots. before-lean/ keeps the serving run before the lean path.
# Run it on an otherwise idle machine: the serving comparison pins its workers to cores 0 and 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-benchmarks/results}"
MODEL_ARGS=()
if [ -n "${MODEL:-}" ]; then MODEL_ARGS=(--model "$MODEL"); fi
read -r -a SERVING_EXTRA <<< "${SERVING_ARGS:-}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$OUT"

TIMINGS=""
step() {
    local name=$1 began=$SECONDS
    shift
    echo "== $name: $*"
    "$@"
    TIMINGS="$TIMINGS${TIMINGS:+, }\"$name\": $((SECONDS - began))"
    echo "{$TIMINGS}" > "$OUT/run_all.json"
}

# The request shape is the model's default (srserve.json next to model_index.json); refuse Wan's 832x480x81.
"$PY" - "${MODEL:-}" <<'PYEOF'
import sys
from srserve.pipeline.engine import SREngine
from srserve.pipeline.spec import resolve_model_spec
from srserve.tiny import default_model_path
d = SREngine.load(resolve_model_spec(sys.argv[1] or default_model_path()), roles=()).family.defaults
print(f"model defaults: {d.width}x{d.height} x {d.num_frames} frames, {d.num_inference_steps} steps")
if d.width * d.height * d.num_frames > 256 * 256 * 33:
    sys.exit("these defaults are far too large for a CPU benchmark: give the model a srserve.json with its own")
PYEOF
rm -f "$OUT/run_all.json"
step single_request "$PY" benchmarks/sr_speedup.py "${MODEL_ARGS[@]}" --repeats 5 --threads 1 \
    --out "$OUT/sr_speedup.json"
# One torch thread, like every serving worker and the single-request benchmark (and robust to a busy machine).
step quality "$PY" -m srserve.cli tiny quality "${MODEL_ARGS[@]}" --videos "${QUALITY_VIDEOS:-64}" --threads 1 \
    --out-json "$OUT/quality.json"
step hop_bytes "$PY" benchmarks/hop_bytes.py --out "$OUT/hop_bytes.json"
# The control plane's CPU per request, the current code against the commit before the lean path, alternating.
step control_plane "$PY" benchmarks/control_plane_cpu.py --repeats "${CPU_REPEATS:-3}" --baseline 8b74458 \
    --out "$OUT/control_plane_cpu.json"
# Serve's throughput mode alone: the same against the commit just before it.
step control_plane_serve_mode "$PY" benchmarks/control_plane_cpu.py --repeats "${CPU_REPEATS:-3}" --baseline 4cb43a0 \
    --out "$OUT/control_plane_cpu_serve_mode.json"
step caches "$PY" benchmarks/cache_compare.py "${MODEL_ARGS[@]}" --videos "${CACHE_VIDEOS:-32}" \
    --out "$OUT/cache_compare.json"
step serving "$PY" benchmarks/serving_compare.py "${MODEL_ARGS[@]}" --time-budget 1800 "${SERVING_EXTRA[@]}" --out "$OUT/serving.json"
# Trust (issue 11): a default job among max-size ones, current against the commit before fair scheduling; faults.
step fairness "$PY" benchmarks/fairness.py --repeats "${FAIRNESS_REPEATS:-2}" --limit-s 150 --out "$OUT/fairness.json"
step faults "$PY" benchmarks/faults.py --out "$OUT"
step report "$PY" benchmarks/report.py --results "$OUT"
echo "done in $SECONDS s: $OUT/REPORT.md"
