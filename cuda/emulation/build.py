"""Build the unmodified cuda/*.cu for the CPU against cuemu.h (docs/cuda-emulation.md).

Each .cu is copied to the build folder with its ``k<<<grid, block, shmem, stream>>>(args)`` launches rewritten into
``::cuemu::launch(k, grid, block, shmem, stream)(args)`` and its ``__shared__`` declarations registered (a ``#line``
keeps g++'s messages on the .cu), compiled with g++ with cuemu.h force-included, and linked with capi.cpp (a C
interface for ctypes) and the unmodified CUDA glue cpp/*_cuda.cpp (one translation unit against torch's headers,
with stand-ins for c10/cuda; glue.h) into one shared library: ``torch.ops.load_library`` on it defines
``torch.ops.safeshape_cuda_emu.<op>`` for every op the glue registers for CUDA.

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
    "plain": ["-O2"],
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                "-DCUEMU_THREADS"],
    "thread": ["-O1", "-g", "-fsanitize=thread", "-DCUEMU_THREADS"],
}
SANITIZER_LIB = {"address": "libasan.so", "thread": "libtsan.so"}

_LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)
_SHARED = re.compile(r"__shared__([^;{}]*);")


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


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def register_shared(src: str) -> str:
    """Each ``__shared__ T a[n], b;`` gets ``CUEMU_SHARED_REG(a) CUEMU_SHARED_REG(b)`` after it (cuemu.h)."""
    def reg(m: re.Match) -> str:
        names = []
        for decl in _split_top(m.group(1)):
            ident = re.findall(r"[A-Za-z_]\w*", decl.split("[", 1)[0])
            if not ident:
                raise ValueError(f"cannot read the __shared__ declaration {m.group(0)!r}")
            names.append(ident[-1])
        return m.group(0) + " " + " ".join(f"CUEMU_SHARED_REG({n})" for n in names)
    return _SHARED.sub(reg, src)


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


_GLUE_REG = re.compile(r"TORCH_LIBRARY_IMPL\(\s*safeshape\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{")


def rewrite_glue(src: str, index: int) -> str:
    """The glue's CUDA registration -> definitions of safeshape_cuda_emu ops (glue.h)."""
    def reg(m: re.Match) -> str:
        lib = f"cuemu_glue_lib_{index}"
        return f"TORCH_LIBRARY_FRAGMENT(safeshape_cuda_emu, {lib}) {{ ::cuemu_glue::Defs {m.group(1)}{{{lib}}};"
    out, n = _GLUE_REG.subn(reg, src)
    if n != 1:
        raise ValueError(f"expected one TORCH_LIBRARY_IMPL(safeshape, CUDA, ...) block, found {n}")
    return out


def _torch_flags() -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, version) of the torch this interpreter imports."""
    import torch
    import torch.utils.cpp_extension as ext

    inc = [f"-I{p}" for p in ext.include_paths()]
    lib = str(Path(torch.__file__).parent / "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ([*inc, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"],
            [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"], torch.__version__)


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _glue_sources(cpp_dir: Path) -> list[Path]:
    return sorted(cpp_dir.glob("*_cuda.cpp"))


def _key(cuda_dir: Path, cpp_dir: Path, mode: str, torch_version: str) -> str:
    h = hashlib.sha256()
    h.update(mode.encode())
    h.update(torch_version.encode())
    h.update(" ".join(COMMON + MODES[mode]).encode())
    h.update(subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout.encode())
    files = sorted(cuda_dir.glob("*.cu")) + sorted(cuda_dir.glob("*.h")) + sorted(cuda_dir.glob("*.cuh"))
    files += [HERE / "cuemu.h", HERE / "capi.cpp", HERE / "glue.h", Path(__file__).resolve()]
    files += sorted((HERE / "include").glob("*.h")) + sorted((HERE / "torch_include").rglob("*.h"))
    files += _glue_sources(cpp_dir) + sorted(cpp_dir.glob("*.h"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(mode: str | None = None, cuda_dir: Path | str | None = None, out: Path | str | None = None,
          quiet: bool = True, cpp_dir: Path | str | None = None) -> Path:
    """The emulated kernel library for ``mode`` (built unless the keyed folder already holds it)."""
    mode = mode or os.environ.get("SAFESHAPE_EMU_SANITIZE") or "plain"
    if mode not in MODES:
        raise ValueError(f"cuda/emulation/build.py: unknown mode {mode!r} (expected one of {sorted(MODES)})")
    cuda_dir = Path(cuda_dir or REPO / "cuda").resolve()
    cpp_dir = Path(cpp_dir or cuda_dir.parent / "cpp").resolve()
    out = Path(out or os.environ.get("SAFESHAPE_EMU_BUILD") or REPO / "build" / "cuda-emu").resolve()
    torch_cflags, torch_ldflags, torch_version = _torch_flags()
    final = out / f"{mode}-{_key(cuda_dir, cpp_dir, mode, torch_version)}"
    lib = final / LIB_NAME
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mode}.tmp-{os.getpid()}-", dir=out))
    try:
        # every source and header of cuda/, rewritten, into src/ (first on the include path)
        src_dir = tmp / "src"
        src_dir.mkdir()
        jobs = []
        for f in sorted(cuda_dir.iterdir()):
            if f.suffix not in (".cu", ".cuh", ".h"):
                continue
            dst = src_dir / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)
            dst.write_text(f'#line 1 "{f}"\n' + register_shared(rewrite_launches(f.read_text())))
            if f.suffix == ".cu":
                jobs.append(dst)
        flags = COMMON + MODES[mode] + ["-I", str(src_dir), "-I", str(HERE / "include"),
                                        "-include", str(HERE / "cuemu.h")]
        jobs.append(HERE / "capi.cpp")
        # the glue, one translation unit (torch's headers are most of the build time)
        unity = ['#include "glue.h"']
        for i, f in enumerate(_glue_sources(cpp_dir)):
            dst = src_dir / f.name
            dst.write_text(f'#line 1 "{f}"\n' + rewrite_glue(f.read_text(), i))
            unity.append(f'#include "{dst.name}"')
        glue = src_dir / "cuda_glue_all.cpp"
        glue.write_text("\n".join(unity) + "\n")
        glue_flags = ["-I", str(HERE / "torch_include"), "-I", str(HERE), "-I", str(cpp_dir), *torch_cflags]

        objects = out / "objects"  # one object per input hash: a mutant of one .cu recompiles only that .cu
        objects.mkdir(exist_ok=True)
        headers = sorted(src_dir.glob("*.h*")) + sorted((HERE / "include").glob("*.h")) + [HERE / "cuemu.h"]
        glue_headers = [h for h in headers if h.suffix == ".h"] + [HERE / "glue.h"] + sorted(cpp_dir.glob("*.h"))
        glue_headers += sorted((HERE / "torch_include").rglob("*.h"))

        def compile_one(src: Path) -> Path:
            extra = glue_flags if src == glue else []
            h = hashlib.sha256(" ".join([*flags, *extra, torch_version]).encode())
            h.update(subprocess.run([_compiler(), "--version"], capture_output=True, text=True).stdout.encode())
            for f in [src, *(glue_headers if src == glue else headers)]:
                h.update(f.name.encode())
                h.update(f.read_bytes())
            for f in (_glue_sources(cpp_dir) if src == glue else []):
                h.update(f.read_bytes())
            obj = objects / f"{src.stem}-{mode}-{h.hexdigest()[:16]}.o"
            if obj.exists():
                return obj
            part = obj.with_name(f".{obj.name}.tmp-{os.getpid()}")
            cmd = [_compiler(), *flags[:-2], *extra, *flags[-2:], "-c", str(src), "-o", str(part)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                part.unlink(missing_ok=True)
                raise RuntimeError(f"cuda/emulation/build.py: compiling {src.name} failed:\n{' '.join(cmd)}\n"
                                   f"{r.stderr}")
            part.replace(obj)
            return obj

        with ThreadPoolExecutor(max_workers=int(os.environ.get("SAFESHAPE_EMU_JOBS", "2"))) as ex:
            objs = list(ex.map(compile_one, [glue, *jobs]))  # the longest first
        cmd = [_compiler(), *COMMON, *MODES[mode], "-shared", "-o", str(tmp / LIB_NAME), *map(str, objs),
               *torch_ldflags]
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
    """The libraries a process must LD_PRELOAD to load a ``mode`` build (None for plain)."""
    name = SANITIZER_LIB.get(mode)
    if name is None:
        return None
    # libstdc++ too: else the sanitizer's __cxa_throw interceptor finds no real __cxa_throw (python links none)
    # and the first C++ exception (a TORCH_CHECK) aborts the process
    libs = [name, "libstdc++.so.6"]
    return " ".join(subprocess.run([_compiler(), f"-print-file-name={n}"], capture_output=True,
                                   text=True).stdout.strip() for n in libs)


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
