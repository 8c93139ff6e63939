"""Which modules Safe LoRA projects (docs/math.md#safe-lora-selection, both modes of the reference code)."""
from __future__ import annotations

from typing import Sequence

import math

from ..errors import SafeshapeError

MODES = ("number", "threshold")


def validate_selection(mode: str, num_layers, threshold, cosine_decimals=None) -> None:
    """Both settings are checked whatever the mode, so a typo never waits for the other mode to bite."""
    if mode not in MODES:
        raise SafeshapeError(f"select: mode must be one of {MODES}, got {mode!r}")
    if not (is_count(num_layers) or is_fraction(num_layers)):
        raise SafeshapeError(f"--num-layers must be a positive integer (a count of modules) or a fraction in (0, 1) "
                             f"of the modules, got {num_layers!r}")
    try:
        threshold_ok = not isinstance(threshold, bool) and 0.0 <= float(threshold) <= 1.0
    except (TypeError, ValueError):
        threshold_ok = False
    if not threshold_ok:
        raise SafeshapeError(f"--threshold must be a number in [0, 1] (cosines lie there), got {threshold!r}")
    if cosine_decimals is not None and (isinstance(cosine_decimals, bool) or not isinstance(cosine_decimals, int)
                                        or not 0 <= cosine_decimals <= 15):
        raise SafeshapeError(f"--cosine-decimals must be an integer in [0, 15], got {cosine_decimals!r}")


def is_count(x) -> bool:
    try:
        return not isinstance(x, bool) and int(x) == x and x >= 1
    except (TypeError, ValueError, OverflowError):
        return False


def is_fraction(x) -> bool:
    return isinstance(x, float) and 0.0 < x < 1.0


def parse_num_layers(text: str) -> int | float | str:
    """``--num-layers``: ``10`` (a count) or ``0.25`` (a fraction of the adapter's modules), as argparse's type;
    anything else is passed on as it is, for :func:`validate_selection` to refuse with the usual error."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


def layer_count(num_layers: int | float, n_modules: int) -> int:
    """The number of modules ``num_layers`` asks for: a count as it is, a fraction f as ceil(f * n_modules)."""
    return math.ceil(num_layers * n_modules) if is_fraction(num_layers) else int(num_layers)


def select_modules(cosines: Sequence[float], mode: str = "number", num_layers: int = 10,
                   threshold: float = 0.5, cosine_decimals: int | None = None) -> tuple[list[bool], float]:
    """Return ``(mask, cut)``: project module i iff ``cosines[i] <= cut``.

    ``cosine_decimals``: compare ``numpy.round(cosine, cosine_decimals)`` instead (the reference code rounds to 5
    decimals, round-half-to-even, before both modes); ``None`` compares the cosines as computed.

    - ``threshold``: ``cut = threshold``.
    - ``number``: ``cut`` = the k-th smallest cosine, k = ``num_layers`` or, for a fraction f in (0, 1),
      ceil(f * modules) (ties can project more than k; k larger than the count projects all).
    """
    import numpy  # here: the CLI imports this module for its argument parser, which must stay light

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
        cut = ranked[max(1, min(layer_count(num_layers, len(ranked)), len(ranked))) - 1]
    return [c <= cut for c in cos], cut
