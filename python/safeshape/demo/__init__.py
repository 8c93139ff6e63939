"""``safeshape demo``: a toy world, made and trained in code, that shows Safe LoRA and DSS end to end on CPU.

:class:`~safeshape.demo.pipeline.Demo` runs it; :mod:`~safeshape.demo.world` is the synthetic language.
"""
from .pipeline import Demo

__all__ = ["Demo"]
