"""The CUDA kernels under CPU emulation (docs/cuda-emulation.md), for tests.

:func:`library` builds (once, cached in build/cuda-emu) and loads the emulated kernels with their unmodified torch
glue: ``torch.ops.safeshape_cuda_emu.<op>`` is the CUDA implementation of ``torch.ops.safeshape.<op>``, running on
CPU tensors. :func:`routed` sends the safeshape ops' CPU dispatch to it for a while, so a test written for a device
runs the CUDA kernels when given ``device="cpu"`` (tests/conftest.py's ``cuda_emu`` parameter); :func:`capi` is the
ctypes view of the same library (the launchers over host pointers and the emulation's own state).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# every op with a CUDA kernel (cpp/*_cuda.cpp registers exactly these)
CUDA_OPS = ["token_logprobs", "token_logprobs_backward_", "full_kl", "full_kl_backward", "star_token_weights",
            "project_lora_b", "lora_cosine"]


def _build_module():
    sys.path.insert(0, str(REPO / "cuda" / "emulation"))
    try:
        import build
    finally:
        sys.path.pop(0)
    return build


def available() -> str | None:
    """None when the emulation can be built here, else why not."""
    if os.environ.get("SAFESHAPE_EMU", "1") == "0":
        return "SAFESHAPE_EMU=0"
    if sys.platform != "linux":
        return "the emulation builds with g++ on Linux"
    return None


@functools.lru_cache(maxsize=None)
def library(mode: str | None = None, cuda_dir: str | None = None) -> Path:
    """Path of the emulated kernels + glue, built if needed and loaded into torch.ops.safeshape_cuda_emu."""
    import safeshape.ops  # noqa: F401  (the safeshape schemas the glue's checks and tests use)

    path = _build_module().build(mode, cuda_dir or os.environ.get("SAFESHAPE_EMU_CUDA_DIR"))
    torch.ops.load_library(str(path))
    return path


@functools.lru_cache(maxsize=None)
def capi() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library()))
    lib.cuemu_message.restype = ctypes.c_char_p
    lib.cuemu_launches.restype = ctypes.c_long
    lib.emu_project_lora_b_workspace_bytes.restype = ctypes.c_size_t
    lib.emu_project_lora_b_workspace_bytes.argtypes = [ctypes.c_int64] * 3
    lib.emu_lora_cosine_workspace_bytes.restype = ctypes.c_size_t
    lib.emu_lora_cosine_workspace_bytes.argtypes = [ctypes.c_int64]
    return lib


def message() -> str:
    """The emulation's detail of its latest fault."""
    return capi().cuemu_message().decode()


@contextlib.contextmanager
def routed():
    """Within: torch.ops.safeshape.<op> on CPU tensors runs the emulated CUDA glue and kernels."""
    library()
    emu = torch.ops.safeshape_cuda_emu
    lib = torch.library.Library("safeshape", "IMPL")
    try:
        for name in CUDA_OPS:
            target = getattr(emu, name)
            lib.impl(name, functools.partial(_call, target), "CPU")
        yield
    finally:
        lib._destroy()


def _call(target, *args):
    return target(*args)
