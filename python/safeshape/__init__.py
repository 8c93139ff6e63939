"""safeshape: keep an aligned LLM's refusals through LoRA fine-tuning.

Native ops live in ``torch.ops.safeshape.*`` (typed wrappers in :mod:`safeshape.ops`, plain-torch references in
:mod:`safeshape.reference`). Safe LoRA over checkpoints is :mod:`safeshape.safelora`.
"""
from __future__ import annotations

__version__ = "0.1.0"


def _check_torch_matches_build() -> None:
    import torch

    try:
        from . import _build_config
    except ImportError as exc:  # pragma: no cover - only on a broken checkout
        raise ImportError(
            "safeshape: the native extension is not built. Build it against the torch you run with: "
            "pip install --no-build-isolation -e .  (or scripts/dev-build.sh for a development build)"
        ) from exc
    if torch.__version__ != _build_config.TORCH_VERSION:
        raise ImportError(
            f"safeshape was built against torch {_build_config.TORCH_VERSION} but torch {torch.__version__} is "
            "imported. A library built against one torch does not load in another: rebuild safeshape with "
            "`pip install --no-build-isolation --no-deps --force-reinstall .` in this environment, or install the "
            f"safeshape wheel built for torch {torch.__version__}."
        )


_check_torch_matches_build()

from . import _C  # noqa: E402  registers torch.ops.safeshape.*
from . import ops  # noqa: E402,F401  registers fake kernels and autograd formulas


def _cmake_prefix_path() -> str:
    import os

    return os.path.join(os.path.dirname(_C.__file__), "share", "cmake")


#: Put this on CMAKE_PREFIX_PATH for ``find_package(safeshape)`` (C++ consumers; see examples/cpp).
cmake_prefix_path = _cmake_prefix_path()


def build_info() -> dict:
    """What this build was compiled against: ``torch_version``, ``cuda`` (bool), ``cuda_version``, ``cuda_archs``;
    and ``cpu_isa``, the CPU code path the projection kernels run (``avx512``, ``avx2`` or ``generic``: the widest
    the CPU has, or the one forced by the environment variable ``SAFESHAPE_ISA``)."""
    info = dict(_C.build_info())
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    info["safeshape_version"] = __version__
    return info


__all__ = ["build_info", "cmake_prefix_path", "ops", "__version__"]
