"""Lazy package exports (PEP 562): a package names what it exports and from which submodule, and the submodule
is imported on first use. This keeps ``import safeshape`` and ``safeshape --help`` free of torch."""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """Return ``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the relative module
    that defines it (``{"load_guard": ".guard"}``); a name mapped to its own module (``{"ops": ".ops"}``) is that
    submodule."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name], package)
        value = module if exports[name] == "." + name else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
