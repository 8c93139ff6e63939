"""safeshape: keep an aligned LLM's refusals through LoRA fine-tuning.

Native ops live in ``torch.ops.safeshape.*``: importing :mod:`safeshape.ops` (typed wrappers; any feature module
that uses an op imports it) loads them. Plain-torch references are :mod:`safeshape.reference`; Safe LoRA over
checkpoints is :mod:`safeshape.safelora`. ``import safeshape`` alone imports no torch (the command line's
``--help`` stays fast); every name below loads its module on first use.
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, {
    "ops": ".ops",
    "reference": ".reference",
    "build_info": "._native",
    "cmake_prefix_path": "._native",
})

__all__ = ["build_info", "cmake_prefix_path", "ops", "reference", "__version__"]
