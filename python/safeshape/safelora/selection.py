"""Which modules Safe LoRA projects (SPEC.md section 1, both modes of the reference code)."""
from __future__ import annotations

from typing import Sequence

from ..errors import SafeshapeError

MODES = ("number", "threshold")


def validate_selection(mode: str, num_layers, threshold) -> None:
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


def select_modules(cosines: Sequence[float], mode: str = "number", num_layers: int = 10,
                   threshold: float = 0.5) -> tuple[list[bool], float]:
    """Return ``(mask, cut)``: project module i iff ``cosines[i] <= cut``.

    - ``threshold``: ``cut = threshold``.
    - ``number``: ``cut`` = the ``num_layers``-th smallest cosine (ties can project more than ``num_layers``;
      ``num_layers`` larger than the count projects all).
    """
    validate_selection(mode, num_layers, threshold)
    cos = [float(c) for c in cosines]
    if mode == "threshold":
        cut = float(threshold)
    else:
        if not cos:
            return [], float("nan")
        ranked = sorted(cos)
        cut = ranked[min(int(num_layers), len(ranked)) - 1]
    return [c <= cut for c in cos], cut
