"""Which modules Safe LoRA projects (SPEC.md section 1, both modes of the reference code)."""
from __future__ import annotations

from typing import Sequence

import numpy

from ..errors import SafeshapeError

MODES = ("number", "threshold")


def select_modules(cosines: Sequence[float], mode: str = "number", num_layers: int = 10,
                   threshold: float = 0.5, cosine_decimals: int | None = None) -> tuple[list[bool], float]:
    """Return ``(mask, cut)``: project module i iff ``cosines[i] <= cut``.

    ``cosine_decimals``: compare ``numpy.round(cosine, cosine_decimals)`` instead (the reference code rounds to 5
    decimals, round-half-to-even, before both modes); ``None`` compares the cosines as computed.

    - ``threshold``: ``cut = threshold``.
    - ``number``: ``cut`` = the ``num_layers``-th smallest cosine (ties can project more than ``num_layers``;
      ``num_layers`` larger than the count projects all).
    """
    if mode not in MODES:
        raise SafeshapeError(f"select: mode must be one of {MODES}, got {mode!r}")
    if cosine_decimals is not None and (isinstance(cosine_decimals, bool) or not isinstance(cosine_decimals, int)
                                        or not 0 <= cosine_decimals <= 15):
        raise SafeshapeError(f"--cosine-decimals must be an integer in [0, 15], got {cosine_decimals!r}")
    cos = [float(c) for c in cosines]
    if cosine_decimals is not None:
        cos = [float(numpy.round(c, cosine_decimals)) for c in cos]
    if mode == "threshold":
        cut = float(threshold)
    else:
        if int(num_layers) != num_layers or num_layers < 1:
            raise SafeshapeError(f"--num-layers must be a positive integer, got {num_layers!r}")
        if not cos:
            return [], float("nan")
        ranked = sorted(cos)
        cut = ranked[min(int(num_layers), len(ranked)) - 1]
    return [c <= cut for c in cos], cut
