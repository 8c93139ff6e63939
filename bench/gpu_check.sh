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

# the real GPU's cases only: the cuda_emu cases (docs/cuda-emulation.md) ran in CI already (SAFESHAPE_EMU=0)
echo "== CUDA tests (pytest -k 'cuda and not cuda_emu' --maxfail=30 -rfE)" | tee "$OUT/tests.log"
SAFESHAPE_EMU=0 timeout 180 $PY -m pytest -q --maxfail=30 -rfE -k "cuda and not cuda_emu and not emulated" tests \
  > "$OUT/tests_full.log" 2>&1
echo "pytest exit $?" >> "$OUT/tests_full.log"
tail -40 "$OUT/tests_full.log" | tee -a "$OUT/tests.log"

# what the CPU emulation cannot show (issue 22): registers and spills of the kernels as ptxas built them (pass 1
# at R = 64 keeps 64 float64 accumulators: 168 registers and no spill on sm_90 at the time of issue 22)
echo "== ptxas resource usage (sm_90)" | tee "$OUT/resources.log"
timeout 120 nvcc -std=c++20 -arch=sm_90 --resource-usage -c cuda/projection.cu -o /tmp/gpu_check_projection.o 2>&1 \
  | grep -A1 "Compiling entry" | grep -E "Used|spill" | sort | uniq -c | tee -a "$OUT/resources.log"

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

echo "== star_token_weights at one chunk per token (issue 22: the tiled search; CPU op in the same run)" \
  | tee -a "$OUT/bench.log"
timeout 60 $PY - <<'PY' 2>&1 | tee -a "$OUT/bench.log"
import time

import torch

import safeshape.ops  # noqa: F401
for seq in (4096, 32768):
    ends, vals = torch.arange(1, seq + 1).repeat(8, 1), torch.randn(8, seq)
    ms = {}
    for dev in ("cpu", "cuda"):
        e, v = ends.to(dev), vals.to(dev)
        torch.ops.safeshape.star_token_weights(v, e, seq)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            torch.ops.safeshape.star_token_weights(v, e, seq)
        torch.cuda.synchronize()
        ms[dev] = (time.perf_counter() - t) / 20 * 1e3
    print(f"star_token_weights batch 8, {seq} tokens, {seq} chunks: cuda {ms['cuda']:.3f} ms, cpu {ms['cpu']:.3f} ms")
PY

echo "== summary ($(( $(date +%s) - T0 )) s in all)" | tee "$OUT/summary.log"
$PY bench/gpu_summary.py "$OUT" 2>&1 | tee -a "$OUT/summary.log"
