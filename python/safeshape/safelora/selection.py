"""Which modules Safe LoRA projects (docs/math.md#safe-lora-selection, both modes of the reference code)."""
from __future__ import annotations

from typing import Sequence

from ..errors import SafeshapeError

MODES = ("number", "threshold")


def select_modules(cosines: Sequence[float], mode: str = "number", num_layers: int = 10,
                   threshold: float = 0.5) -> tuple[list[bool], float]:
    """Return ``(mask, cut)``: project module i iff ``cosines[i] <= cut``.

    - ``threshold``: ``cut = threshold``.
    - ``number``: ``cut`` = the ``num_layers``-th smallest cosine (ties can project more than ``num_layers``;
      ``num_layers`` larger than the count projects all).
    """
    if mode not in MODES:
        raise SafeshapeError(f"select: mode must be one of {MODES}, got {mode!r}")
    cos = [float(c) for c in cosines]
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
