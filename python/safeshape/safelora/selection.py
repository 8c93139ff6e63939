"""Which modules Safe LoRA projects (docs/math.md#safe-lora-selection, both modes of the reference code)."""
from __future__ import annotations

from typing import Sequence

import numpy

from ..errors import SafeshapeError

MODES = ("number", "threshold")


def validate_selection(mode: str, num_layers, threshold, cosine_decimals=None) -> None:
    """Both settings are checked whatever the mode, so a typo never waits for the other mode to bite."""
    if mode not in MODES:
        raise SafeshapeError(f"select: mode must be one of {MODES}, got {mode!r}")
    try:
        layers_ok = not isinstance(num_layers, bool) and int(num_layers) == num_layers and num_layers >= 1
    except (TypeError, ValueError, OverflowError):
        layers_ok = False
    if not layers_ok:
        raise SafeshapeError(f"--num-layers must be a positive integer, got {num_layers!r}")
    try:
        threshold_ok = not isinstance(threshold, bool) and 0.0 <= float(threshold) <= 1.0
    except (TypeError, ValueError):
        threshold_ok = False
    if not threshold_ok:
        raise SafeshapeError(f"--threshold must be a number in [0, 1] (cosines lie there), got {threshold!r}")
    if cosine_decimals is not None and (isinstance(cosine_decimals, bool) or not isinstance(cosine_decimals, int)
                                        or not 0 <= cosine_decimals <= 15):
        raise SafeshapeError(f"--cosine-decimals must be an integer in [0, 15], got {cosine_decimals!r}")


def select_modules(cosines: Sequence[float], mode: str = "number", num_layers: int = 10,
                   threshold: float = 0.5, cosine_decimals: int | None = None) -> tuple[list[bool], float]:
    """Return ``(mask, cut)``: project module i iff ``cosines[i] <= cut``.

    ``cosine_decimals``: compare ``numpy.round(cosine, cosine_decimals)`` instead (the reference code rounds to 5
    decimals, round-half-to-even, before both modes); ``None`` compares the cosines as computed.

    - ``threshold``: ``cut = threshold``.
    - ``number``: ``cut`` = the ``num_layers``-th smallest cosine (ties can project more than ``num_layers``;
      ``num_layers`` larger than the count projects all).
    """
    validate_selection(mode, num_layers, threshold, cosine_decimals)
    cos = [float(c) for c in cosines]
    if cosine_decimals is not None:
        cos = [float(numpy.round(c, cosine_decimals)) for c in cos]
    if mode == "threshold":
        cut = float(threshold)
    else:
        if not cos:
            return [], float("nan")
        ranked = sorted(cos)
        cut = ranked[min(int(num_layers), len(ranked)) - 1]
    return [c <= cut for c in cos], cut
