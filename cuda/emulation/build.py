"""Build the unmodified cuda/*.cu for the CPU against cuemu.h (docs/cuda-emulation.md).

Each .cu is copied to the build folder with its ``k<<<grid, block, shmem, stream>>>(args)`` launches rewritten into
``::cuemu::launch(k, grid, block, shmem, stream)(args)`` (a ``#line`` keeps g++'s messages on the .cu), compiled
with g++ with cuemu.h force-included, and linked with capi.cpp into one shared library for ctypes.

The build folder is keyed on everything that goes into it (sources, headers, flags, compiler), so a second run with
the same inputs is a cache hit: ``build/cuda-emu/<mode>-<key>/libsafeshape_cuda_emu.so``.

    python cuda/emulation/build.py [--mode plain|address|thread] [--cuda-dir DIR] [--out DIR]

Modes: ``plain`` (fibers, the default), ``address`` (AddressSanitizer + UBSan, one std::thread per CUDA thread),
``thread`` (ThreadSanitizer, one std::thread per CUDA thread). ``SAFESHAPE_EMU_SANITIZE`` picks the mode when
``--mode`` is not given. The sanitizer libraries must be preloaded into the process that loads the library
(:func:`sanitizer_preload`).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LIB_NAME = "libsafeshape_cuda_emu.so"

COMMON = ["-std=c++20", "-fPIC", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
          "-Wno-unused-parameter"]
MODES = {
    "plain": ["-O2", "-DCUEMU_SHARED_SECTION"],
    # no shared section here: ASan puts redzones around ordinary statics only, so a __shared__ overrun shows
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                "-DCUEMU_THREADS"],
    "thread": ["-O1", "-g", "-fsanitize=thread", "-DCUEMU_THREADS", "-DCUEMU_SHARED_SECTION"],
}
SANITIZER_LIB = {"address": "libasan.so", "thread": "libtsan.so"}

_LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)


def _callee_start(src: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (a name, template arguments allowed)."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if i > 0 and src[i - 1] == ">":  # template arguments: match the angle brackets backwards
        depth = 0
        while i > 0:
            i -= 1
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(src: str) -> str:
    """``k<<<cfg>>>(args)`` -> ``::cuemu::launch(k, cfg)(args)``."""
    out, pos = [], 0
    for m in _LAUNCH.finditer(src):
        start = _callee_start(src, m.start())
        if start < pos:
            raise ValueError(f"cannot find the kernel of the launch at offset {m.start()}")
        callee = src[start:m.start()].strip()
        if not callee:
            raise ValueError(f"cannot find the kernel of the launch at offset {m.start()}")
        out.append(src[pos:start])
        out.append(f"::cuemu::launch({callee}, {' '.join(m.group(1).split())})")
        pos = m.end()
    out.append(src[pos:])
    return "".join(out)


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _key(cuda_dir: Path, mode: str) -> str:
    h = hashlib.sha256()
    h.update(mode.encode())
    h.update(" ".join(COMMON + MODES[mode]).encode())
    h.update(subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout.encode())
    files = sorted(cuda_dir.glob("*.cu")) + sorted(cuda_dir.glob("*.h")) + sorted(cuda_dir.glob("*.cuh"))
    files += [HERE / "cuemu.h", HERE / "capi.cpp", Path(__file__).resolve()] + sorted((HERE / "include").glob("*.h"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(mode: str | None = None, cuda_dir: Path | str | None = None, out: Path | str | None = None,
          quiet: bool = True) -> Path:
    """The emulated kernel library for ``mode`` (built unless the keyed folder already holds it)."""
    mode = mode or os.environ.get("SAFESHAPE_EMU_SANITIZE") or "plain"
    if mode not in MODES:
        raise ValueError(f"cuda/emulation/build.py: unknown mode {mode!r} (expected one of {sorted(MODES)})")
    cuda_dir = Path(cuda_dir or REPO / "cuda").resolve()
    out = Path(out or os.environ.get("SAFESHAPE_EMU_BUILD") or REPO / "build" / "cuda-emu").resolve()
    final = out / f"{mode}-{_key(cuda_dir, mode)}"
    lib = final / LIB_NAME
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mode}.tmp-{os.getpid()}-", dir=out))
    try:
        flags = COMMON + MODES[mode] + ["-I", str(HERE / "include"), "-I", str(cuda_dir),
                                        "-include", str(HERE / "cuemu.h")]
        jobs = []
        for cu in sorted(cuda_dir.glob("*.cu")):
            cpp = tmp / (cu.stem + ".cpp")
            cpp.write_text(f'#line 1 "{cu}"\n' + rewrite_launches(cu.read_text()))
            jobs.append(cpp)
        jobs.append(HERE / "capi.cpp")

        def compile_one(src: Path) -> Path:
            obj = tmp / (src.stem + ".o")
            cmd = [_compiler(), *flags, "-c", str(src), "-o", str(obj)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cuda/emulation/build.py: compiling {src.name} failed:\n{' '.join(cmd)}\n"
                                   f"{r.stderr}")
            return obj

        with ThreadPoolExecutor(max_workers=int(os.environ.get("SAFESHAPE_EMU_JOBS", "2"))) as ex:
            objs = list(ex.map(compile_one, jobs))
        cmd = [_compiler(), *COMMON, *MODES[mode], "-shared", "-o", str(tmp / LIB_NAME), *map(str, objs)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda/emulation/build.py: linking failed:\n{' '.join(cmd)}\n{r.stderr}")
        try:
            tmp.rename(final)
        except OSError:  # a concurrent build finished first: keep its copy
            if not lib.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"built {lib}", file=sys.stderr)
    return lib


def sanitizer_preload(mode: str) -> str | None:
    """The runtime library a process must LD_PRELOAD to load a ``mode`` build (None for plain)."""
    name = SANITIZER_LIB.get(mode)
    if name is None:
        return None
    return subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=sorted(MODES), default=None)
    p.add_argument("--cuda-dir", default=None, help="folder of the .cu sources (default: the repository's cuda/)")
    p.add_argument("--out", default=None, help="build folder (default: build/cuda-emu)")
    p.add_argument("--print-preload", action="store_true", help="print the sanitizer library to LD_PRELOAD")
    a = p.parse_args(argv)
    if a.print_preload:
        print(sanitizer_preload(a.mode or os.environ.get("SAFESHAPE_EMU_SANITIZE") or "plain") or "")
        return 0
    print(build(a.mode, a.cuda_dir, a.out, quiet=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
