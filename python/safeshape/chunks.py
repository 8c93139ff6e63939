"""STAR's chunks: a response cut into chunks of M whitespace words (docs/math.md#star-chunks-and-prefixes), and
the chunks' values mapped onto a policy's tokens (docs/math.md#star-token-weights). The part of STAR that training
data needs, on a floor below both :mod:`safeshape.data` and :mod:`safeshape.star` (torch is imported where used)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from .errors import SafeshapeError

if TYPE_CHECKING:
    import torch

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


def token_weights(token_offsets: Sequence[tuple[int, int]], response_start: int, response: str,
                  values: Sequence[float], chunk_words: int) -> torch.Tensor:
    """One STAR weight per token of a training text (float32, CPU).

    ``token_offsets`` are the (start, end) character offsets of every token of the full training text (a fast
    tokenizer's ``return_offsets_mapping`` on the policy's chat-template output); ``response_start`` is the character
    index where ``response`` begins in that text; ``values`` are the STAR values, one per chunk of ``chunk_words``
    whitespace words. Rules, in token order:

    - tokens before the first token that ends after ``response_start`` get 0 (prompt tokens carry no loss);
    - from there on, a token gets the value of the chunk its first non-space character falls in; a token with no
      non-space character inside the response (whitespace between chunks) goes with the next word's chunk, so a
      chunk's leading whitespace is part of it, and a token before the first word goes to chunk 1;
    - tokens after the response (the template's end-of-turn tokens) get the last chunk's value, and so does a
      token with empty offsets such as a special token the tokenizer appends.

    The assignment is monotone in token order. An empty response (no words) has no chunks: then ``values`` must be
    empty and every weight is 0.
    """
    import numpy as np
    import torch

    from .ops import star_token_weights

    spans = chunk_char_spans(response, chunk_words)
    if len(values) != len(spans):
        raise SafeshapeError(f"token_weights: values has {len(values)} entries but the response has {len(spans)} "
                             f"chunks of {chunk_words} words (were the values computed with another chunk_words or "
                             "another response text?)")
    n = len(token_offsets)
    if n == 0 or not spans:
        return torch.zeros(n, dtype=torch.float32)
    offsets = np.asarray(token_offsets, dtype=np.int64).reshape(n, 2)
    length = len(response)
    # next_nonspace[i]: index of the first non-space character at or after i (length if none)
    nonspace = np.fromiter((not c.isspace() for c in response), dtype=bool, count=length)
    idx = np.where(nonspace, np.arange(length), length)
    next_nonspace = np.append(np.minimum.accumulate(idx[::-1])[::-1], length)
    ends_in_text = offsets[:, 1]
    after_start = np.nonzero(ends_in_text > response_start)[0]
    t0 = int(after_start[0]) if after_start.size else n
    # each response token's key: its first non-space character (or the next one), in response coordinates
    lo = np.clip(offsets[t0:, 0] - response_start, 0, length)
    keys = np.maximum.accumulate(next_nonspace[lo]) if lo.size else lo
    chunk_end_chars = np.asarray([end for _, end in spans[:-1]], dtype=np.int64)
    # tokens of chunks 1..k = response tokens whose key lies before chunk k's last character's end
    chunk_ends = t0 + np.searchsorted(keys, chunk_end_chars, side="left")
    vals = torch.tensor([0.0, *values], dtype=torch.float32)[None]
    ends = torch.tensor([t0, *chunk_ends.tolist(), n], dtype=torch.int64)[None]
    return star_token_weights(vals, ends, n)[0]


def authors_token_weights(tokenizer, prompt_messages: list[dict], response: str, values: Sequence[float],
                          chunk_words: int, n_tokens: int, first_response_token: int) -> torch.Tensor:
    """STAR weights with the authors' boundaries (docs/math.md#star-authors-recipe), for a training text of ``n_tokens`` tokens whose
    response starts at token ``first_response_token``: chunk k's tokens end at the token length of the whole
    chat rendered with the policy's template up to prefix k (``" ".join(words[:k M])``, end-of-turn tokens
    included), so each boundary sits a few tokens later than :func:`token_weights`' character mapping. Tokens
    before the response get 0; tokens after the last boundary the last value."""
    import torch

    from .ops import star_token_weights

    words = response.split()
    k = len(values)
    if k != len(chunk_char_spans(response, chunk_words)):
        raise SafeshapeError(f"authors_token_weights: values has {k} entries but the response has "
                             f"{len(chunk_char_spans(response, chunk_words))} chunks of {chunk_words} words")
    if n_tokens == 0 or k == 0:
        return torch.zeros(n_tokens, dtype=torch.float32)
    ends = [first_response_token]
    for j in range(1, k):
        msgs = list(prompt_messages) + [{"role": "assistant", "content": " ".join(words[:j * chunk_words])}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        ends.append(min(max(length, ends[-1]), n_tokens))  # monotone, inside the text
    ends.append(n_tokens)
    vals = torch.tensor([0.0, *values], dtype=torch.float32)[None]
    return star_token_weights(vals, torch.tensor(ends, dtype=torch.int64)[None], n_tokens)[0]
