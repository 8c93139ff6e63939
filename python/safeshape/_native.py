"""Loads the native library (``torch.ops.safeshape.*``) after checking it was built for the torch imported.
Imported by :mod:`safeshape.ops`; nothing else needs to import it."""
from __future__ import annotations

import os

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

from . import _C  # noqa: E402  registers torch.ops.safeshape.*

#: Put this on CMAKE_PREFIX_PATH for ``find_package(safeshape)`` (C++ consumers; see examples/cpp).
cmake_prefix_path = os.path.join(os.path.dirname(_C.__file__), "share", "cmake")


def build_info() -> dict:
    """What this build was compiled against: ``torch_version``, ``cuda`` (bool), ``cuda_version``, ``cuda_archs``;
    and ``cpu_isa``, the CPU code path the projection kernels run (``avx512``, ``avx2`` or ``generic``: the widest
    the CPU has, or the one forced by the environment variable ``SAFESHAPE_ISA``)."""
    from . import __version__

    info = dict(_C.build_info())
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    info["safeshape_version"] = __version__
    return info


def cpu_fma_rate(seconds: float = 0.02) -> dict:
    """For benchmarks: fused multiply-adds per second (vector lanes counted) that one thread of the CPU code path
    ``build_info()["cpu_isa"]`` reaches on register-only data, as ``{"float64": ..., "float32": ...}``. The compute
    bound that ``bench/bench_projection.py`` prints comes from it."""
    return dict(_C.cpu_fma_rate(seconds))
