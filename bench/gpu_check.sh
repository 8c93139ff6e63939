#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (see docs/benchmarks.md): build against that machine's own torch, run the
# CUDA tests and the benchmarks, write everything under $OUT (default bench/out/gpu), and end with a compact
# summary. Budget: 10 minutes in all (build <= 2.5 with one arch, tests <= 3, benches <= 4); run it alone in the
# call with timeout_s 600:
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 SAFESHAPE_CUDA=ON SAFESHAPE_CUDA_ARCHS=${SAFESHAPE_CUDA_ARCHS:-9.0}
T0=$(date +%s)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$GPU" in *H200*) HBM=4800 ;; *) HBM=3350 ;; esac  # GB/s: H200 4.8 TB/s, H100 SXM 3.35 TB/s
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== build (pip install --no-build-isolation --no-deps --no-index -e .)"
  t0=$(date +%s)
  timeout 200 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . || { echo BUILD FAILED; exit 1; }
  echo "build took $(( $(date +%s) - t0 )) s"
  $PY -c "import safeshape; print(safeshape.build_info())"
} 2>&1 | tee "$OUT/build.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

echo "== CUDA tests (pytest -k cuda --maxfail=30 -rfE)" | tee "$OUT/tests.log"
timeout 180 $PY -m pytest -q --maxfail=30 -rfE -k "cuda" tests > "$OUT/tests_full.log" 2>&1
echo "pytest exit $?" >> "$OUT/tests_full.log"
tail -40 "$OUT/tests_full.log" | tee -a "$OUT/tests.log"

echo "== benchmarks (HBM floor $HBM GB/s)" | tee "$OUT/bench.log"
timeout 60 $PY bench/bench_projection.py --device cuda --hbm-gbps "$HBM" --no-reference \
  --json "$OUT/projection.json" 2>&1 | tee -a "$OUT/bench.log"
timeout 120 $PY bench/bench_dss_loss.py --device cuda --json "$OUT/bench_dss_loss.json" 2>&1 | tail -30 \
  | tee -a "$OUT/bench.log"
for b in bench/bench_star.py bench/bench_train_step.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  timeout 45 $PY "$b" --device cuda --json "$OUT/$name.json" 2>&1 | tail -15 | tee -a "$OUT/bench.log"
done

echo "== summary ($(( $(date +%s) - T0 )) s in all)" | tee "$OUT/summary.log"
$PY bench/gpu_summary.py "$OUT" 2>&1 | tee -a "$OUT/summary.log"
