"""Segmentation of a response into chunks of M whitespace words (docs/math.md#star-chunks-and-prefixes)."""
from __future__ import annotations

import re

from ..errors import SafeshapeError

_WORD = re.compile(r"\S+")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the whitespace-separated words of ``text`` (what ``str.split()`` splits)."""
    return [m.span() for m in _WORD.finditer(text)]


def check_chunk_words(chunk_words: int) -> int:
    if isinstance(chunk_words, bool) or not isinstance(chunk_words, int) or chunk_words < 1:
        raise SafeshapeError(f"chunk_words must be a positive integer, got {chunk_words!r}")
    return chunk_words


def chunk_char_spans(response: str, chunk_words: int) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each chunk of ``response``: chunk k (1-based) is whitespace words
    ``[(k-1)M, kM)``, from its first word's first character to its last word's last character.

    The whitespace between two chunks belongs to neither span. An empty or all-whitespace response has no chunks.
    """
    m = check_chunk_words(chunk_words)
    words = word_spans(response)
    return [(words[i][0], words[min(i + m, len(words)) - 1][1]) for i in range(0, len(words), m)]


def prefix_text(response: str, spans: list[tuple[int, int]], k: int) -> str:
    """Prefix k (1-based) as the guard sees it: the response from its first word to the end of chunk k."""
    return response[spans[0][0]:spans[k - 1][1]]
