"""Mutation check of the emulated CUDA tests (docs/cuda-emulation.md): each mutation is applied to a temporary copy
of cuda/ and cpp/, the emulated kernels are rebuilt from it, and the emulated tests run against them; a mutation is
caught when the tests fail. The repository's sources are never written.

    python cuda/emulation/mutate.py [--only NAME] [--json PATH]

Mutations: a removed __syncthreads (block_sum, block_lse, the star tile's scan), a dropped bounds guard (run
under AddressSanitizer, as a GPU would fault or corrupt silently), a broken shuffle mask, the two bugs of issue 22
put back. Prints one line per mutation and a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import build  # noqa: E402

# name: (file under the repository, text, replacement, build mode, pytest selection)
EMU_TESTS = ["tests/test_cuda_emulated.py"]
STAR = ["tests/test_star_ops.py", "-k", "cuda_emu"]
STAR_ASAN = ["tests/test_cuda_emulated.py", "-k", "star_chunk"]
TOKEN = ["tests/test_ops_token_loss.py", "-k", "cuda_emu and (token_logprobs_matches or full_kl_matches)"]
PROJ = ["tests/test_ops_projection.py", "-k", "cuda_emu and project_lora_b_matches_fp64"]
MUTATIONS = {
    "block_sum_no_sync": ("cuda/block_reduce.cuh",
                          "  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;\n  __syncthreads();",
                          "  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;", "plain", TOKEN),
    "block_lse_no_sync": ("cuda/token_loss.cu", "    ss[warp] = st.s;\n  }\n  __syncthreads();",
                          "    ss[warp] = st.s;\n  }", "plain", TOKEN),
    "star_tile_no_sync": ("cuda/star.cu", "        if (left > tile[threadIdx.x]) tile[threadIdx.x] = left;\n"
                          "        __syncthreads();", "        if (left > tile[threadIdx.x]) tile[threadIdx.x] = left;",
                          "plain", STAR),
    "shuffle_mask_broken": ("cuda/block_reduce.cuh", "__shfl_xor_sync(0xffffffffu, v, o)",
                            "__shfl_xor_sync(0x7fffffffu, v, o)", "plain", TOKEN),
    "star_write_guard_dropped": ("cuda/star.cu", "    if (t < seq_len) weights[b * seq_len + t]",
                                 "    weights[b * seq_len + t]", "address", STAR_ASAN),
    "pass1_column_guard_dropped": ("cuda/projection.cu", "  if (j < d_in) {\n    double* p", "  {\n    double* p",
                                   "address", PROJ),
    "bug1_merge_drops_nan": ("cuda/token_loss.cu", "    if (om == -INFINITY) {\n      s += os;\n      return;",
                             "    if (om == -INFINITY) {\n      return;", "plain", EMU_TESTS),
    "bug2_kl_nan_p_to_zero": ("cuda/token_loss.cu", "return p == A(0) ? A(0) : p * (lz - rlse.log_prob(rj));",
                              "return p > A(0) ? p * (lz - rlse.log_prob(rj)) : A(0);", "plain", EMU_TESTS),
}


def run_one(name: str, python: str, out: Path) -> dict:
    path, old, new, mode, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutate-{name}-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "cuda", root / "cuda", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "cpp", root / "cpp")
        target = root / path
        src = target.read_text()
        if src.count(old) != 1:
            return {"mutation": name, "error": f"{path}: the text to mutate is not there exactly once"}
        target.write_text(src.replace(old, new))
        t0 = time.time()
        build.build(mode, root / "cuda", out)
        env = dict(os.environ, SAFESHAPE_EMU_CUDA_DIR=str(root / "cuda"), SAFESHAPE_EMU_SANITIZE=mode,
                   SAFESHAPE_EMU_BUILD=str(out))
        if mode != "plain":
            env["LD_PRELOAD"] = build.sanitizer_preload(mode)
            env["ASAN_OPTIONS"] = f"detect_leaks=0:log_path={root}/sanitizer"  # pytest's capture would drop it
        first = EMU_TESTS if mode == "plain" else tests  # the sanitizer builds are slow: their own tests only
        r = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *first], cwd=REPO,
                           env=env, capture_output=True, text=True)
        if r.returncode == 0 and tests != first:  # then the device tests' cuda_emu cases (their own -k)
            r = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=REPO,
                               env=env, capture_output=True, text=True)
        tail = (r.stdout + r.stderr).strip().splitlines()
        summary = next((ln for ln in reversed(tail) if " passed" in ln or " failed" in ln or "error" in ln.lower()),
                       tail[-1] if tail else "")
        logs = [ln for f in sorted(root.glob("sanitizer*")) for ln in f.read_text(errors="replace").splitlines()]
        asan = next((ln for ln in logs + tail if "ERROR: AddressSanitizer" in ln or "runtime error" in ln), "")
        return {"mutation": name, "file": path, "mode": mode, "caught": r.returncode != 0, "exit": r.returncode,
                "summary": summary.strip(), "sanitizer": asan.strip(), "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=sorted(MUTATIONS))
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--out", default=str(REPO / "build" / "cuda-emu-mutants"), help="build folder of the mutants")
    a = p.parse_args(argv)
    results = []
    for name in a.only or list(MUTATIONS):
        res = run_one(name, sys.executable, Path(a.out))
        results.append(res)
        verdict = "error" if "error" in res else ("caught" if res["caught"] else "NOT CAUGHT")
        print(f"{name:28s} {verdict:10s} {res.get('summary', res.get('error'))} {res.get('sanitizer', '')}",
              flush=True)
    text = json.dumps(results, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0 if all(r.get("caught") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
