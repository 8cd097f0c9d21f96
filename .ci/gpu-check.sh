#!/usr/bin/env bash
# The GPU checks of the comparison issue, as one command, in the project root of a CUDA machine:
#
#   .ci/gpu-check.sh                      # H200-class GPU: everything below on CUDA
#   GPU_CHECK_DRY=1 .ci/gpu-check.sh      # dry run on a CPU machine: same steps, --device cpu --provider cpu,
#                                         # a small DARTS recipe; `pytest -m gpu` then only shows its skips
#
# Steps (each under its own `timeout`, each writing under $OUT, default /tmp/flexslim-gpu-check):
#   1. pytest -m gpu              search epoch on CUDA (bf16, channels_last), validate on onnxruntime's CUDA
#                                 provider with IO binding, the quickstart job through export and the gate,
#                                 tensor memory from CUDA, the bench's memory figure from CUDA
#   2. flexslim bench             cifar10-darts on the synthetic dataset, a few search epochs at batch 96,
#                                 FlexCHarts vs DMask-large: seconds per epoch and peak GB (max allocated)
#   3. the quickstart main job    flexslim search --provider cuda, then flexslim export (the gate) on CUDA,
#                                 budget 3x the family's measured floor on this GPU
# If .gpu/setup.sh exists (see ../shared/gpu/README.md), it is sourced first: it installs onnxruntime-gpu.
# Environment: OUT, GPU_CHECK_DRY, EPOCHS (search epochs of step 2, default 3), BUDGET_MS (step 2's budget;
# default 1.5x the DARTS family's floor in the latency table measured here, which the bench then shares), T_PYTEST / T_BENCH / T_JOB (timeouts, seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flexslim-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
result() { echo "   -> exit $1" | tee -a "$OUT/summary.txt"; [ "$1" = 0 ] || status=1; }

if [ -f .gpu/setup.sh ]; then . .gpu/setup.sh || echo "onnxruntime-gpu setup failed: the CUDA provider will be missing"; fi
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), '| torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/machine.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/machine.txt" 2>/dev/null || true

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DEVICE=cpu PROVIDER=cpu RECIPE=darts-smoke EPOCHS=${EPOCHS:-1}
  EXTRA=(--set data.image_size=16 --set search.batch_size=96 --set latency.samples=4 --set latency.holdout=1)
  QS=(--set search.epochs=2 --set train.epochs=1 --set latency.min_seconds=0.2)
else
  DEVICE=cuda PROVIDER=cuda RECIPE=cifar10-darts EPOCHS=${EPOCHS:-3}
  EXTRA=(--set search.batch_size=96 --set latency.samples=12 --set latency.holdout=2)
  QS=()  # the README's quickstart job as it is
fi
LAT=(--set latency.min_seconds=0.3 --set "latency.provider=$PROVIDER")

step "1. pytest -m gpu"
timeout "${T_PYTEST:-900}" python3 -m pytest -o addopts="" -m gpu -q -rs --junitxml "$OUT/pytest-gpu.xml" tests/test_gpu.py \
  > "$OUT/pytest-gpu.txt" 2>&1
result $?
tail -5 "$OUT/pytest-gpu.txt"

step "2. bench: $RECIPE on synthetic data, $EPOCHS search epochs, batch 96, $DEVICE / $PROVIDER"
timeout "${T_BENCH:-1800}" flexslim profile --recipe "$RECIPE" --set data.dataset=synthetic "${EXTRA[@]}" "${LAT[@]}" \
  --out "$OUT/darts-latency.json" > "$OUT/darts-profile.txt" 2>&1
budget=${BUDGET_MS:-$(python3 -c "import json; print(round(1.5 * json.load(open('$OUT/darts-latency.json'))['floor_ms'], 5))")}
echo "   budget $budget ms/sample" | tee -a "$OUT/summary.txt"
timeout "${T_BENCH:-1800}" flexslim bench --recipe "$RECIPE" --methods flexcharts,dmask-large --latency-ms "$budget" \
  --device "$DEVICE" --out "$OUT/bench-darts" --latency-table "$OUT/darts-latency.json" \
  --set data.dataset=synthetic --set "search.epochs=$EPOCHS" \
  "${EXTRA[@]}" "${LAT[@]}" > "$OUT/bench-darts.txt" 2>&1
result $?
python3 - "$OUT/bench-darts/bench.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
for r in json.load(open(sys.argv[1])):
    if "error" in r:
        print(f"   {r['method']}: failed: {r['error']}")
        continue
    gb = r.get("cuda_max_allocated_mb") or r.get("tensor_peak_mb") or 0
    print(
        f"   {r['method']}: {r['seconds_per_epoch']:.1f} s/epoch ({r['epochs']} epochs, {r['device']}), "
        f"peak {gb / 1024:.2f} GB ({'max allocated' if r.get('cuda_max_allocated_mb') else 'live tensors'}), "
        f"tensor peak {r['tensor_peak_mb'] / 1024:.2f} GB, widths {'/'.join(map(str, r['widths'].values()))}, "
        f"{r['measured_ms']:.4f} ms measured ({'met' if r['budget_met'] else 'MISSED'})"
    )
EOF

step "3. quickstart main job with --provider $PROVIDER (search -> export -> gate)"
job="$OUT/quickstart-job"
mkdir -p "$job"
(
  cd "$job" || exit 2
  timeout "${T_JOB:-900}" flexslim profile --recipe quickstart --provider "$PROVIDER" ${QS[@]+"${QS[@]}"} --out latency.json \
    > profile.txt 2>&1 || exit $?
  qs=$(python3 -c "import json; print(round(3 * json.load(open('latency.json'))['floor_ms'], 5))")
  echo "   budget $qs ms/sample (3x the floor on this machine)"
  timeout "${T_JOB:-900}" flexslim search --recipe quickstart --latency-ms "$qs" --device "$DEVICE" \
    --provider "$PROVIDER" --latency-table latency.json ${QS[@]+"${QS[@]}"} > search.txt 2>&1 || exit $?
  timeout "${T_JOB:-900}" flexslim export model.onnx --provider "$PROVIDER" > export.txt 2>&1
) | tee -a "$OUT/summary.txt"
result "${PIPESTATUS[0]}"
tail -3 "$job/export.txt" 2>/dev/null | tee -a "$OUT/summary.txt"

echo "results in $OUT (summary.txt, pytest-gpu.txt/.xml, bench-darts/bench.md, quickstart-job/)"
exit $status
