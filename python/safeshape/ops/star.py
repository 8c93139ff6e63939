"""STAR op (docs/math.md#star-token-weights): expand per-chunk STAR values to per-token weights."""
from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.safeshape


def star_token_weights(values: Tensor, chunk_ends: Tensor, seq_len: int) -> Tensor:
    """Per-token weights from per-chunk values: ``weights[b, t] = values[b, k]`` for the first chunk ``k`` with
    ``chunk_ends[b, k] > t``.

    So chunk ``k`` gives its value to the tokens at/after the previous chunk's end and before its own end (token
    indices, exclusive end). A negative end (``-1``) marks a padding chunk, which covers nothing; tokens at or after
    the last end get 0. ``values`` is ``[B, K]`` (any float dtype, kept in the output), ``chunk_ends`` is ``[B, K]``
    int64 or int32, the result is ``[B, seq_len]``. No gradient (STAR values are data, computed offline).
    """
    return _ops.star_token_weights(values, chunk_ends, seq_len)


@torch.library.register_fake("safeshape::star_token_weights")
def _star_token_weights_fake(values, chunk_ends, seq_len):
    torch._check(values.dim() == 2, lambda: "star_token_weights: values must be 2-D [batch, chunks]")
    torch._check(chunk_ends.shape == values.shape, lambda: "star_token_weights: chunk_ends must match values")
    torch._check(seq_len >= 0, lambda: "star_token_weights: seq_len must be >= 0")
    return values.new_empty((values.shape[0], seq_len))
