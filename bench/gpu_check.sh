#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (see README "The GPU"): build against that machine's own torch, run the
# CUDA tests and the benchmarks, write everything under $OUT (default bench/out/gpu). Budget: ~8 minutes.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 SAFESHAPE_CUDA=ON SAFESHAPE_CUDA_ARCHS=${SAFESHAPE_CUDA_ARCHS:-9.0}
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== build (pip install --no-build-isolation --no-deps --no-index -e .)"
  t0=$(date +%s)
  $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . || { echo BUILD FAILED; exit 1; }
  echo "build took $(( $(date +%s) - t0 )) s"
  $PY -c "import safeshape; print(safeshape.build_info())"
} 2>&1 | tee "$OUT/build.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

echo "== CUDA tests" | tee "$OUT/tests.log"
timeout 240 $PY -m pytest -q -x -k "cuda" tests 2>&1 | tail -25 | tee -a "$OUT/tests.log"

echo "== benchmarks" | tee "$OUT/bench.log"
timeout 120 $PY bench/bench_projection.py --device cuda --hbm-gbps 3350 --json "$OUT/projection.json" 2>&1 | tee -a "$OUT/bench.log"
for b in bench/bench_dss_loss.py bench/bench_star.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  timeout 150 $PY "$b" --device cuda --json "$OUT/$name.json" 2>&1 | tail -30 | tee -a "$OUT/bench.log"
done
echo "== done; results in $OUT"
