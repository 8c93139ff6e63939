"""Plain-torch reference of the STAR op (docs/math.md#star-token-weights)."""
from __future__ import annotations

import torch
from torch import Tensor


def star_token_weights(values: Tensor, chunk_ends: Tensor, seq_len: int) -> Tensor:
    """``weights[b, t] = values[b, k]`` for the first ``k`` with ``chunk_ends[b, k] > t``; 0 when there is none.

    Forms the full ``[B, K, seq_len]`` comparison: obvious, and as slow as that sounds.
    """
    if values.shape[1] == 0:
        return values.new_zeros((values.shape[0], seq_len))
    t = torch.arange(seq_len, device=values.device)
    covers = chunk_ends.to(torch.int64)[:, :, None] > t[None, None, :]  # [B, K, T]: chunk k ends after token t
    any_chunk = covers.any(dim=1)
    first = covers.to(torch.int8).argmax(dim=1)  # first True along K (0 when none; masked below)
    picked = torch.gather(values, 1, first)
    return torch.where(any_chunk, picked, torch.zeros((), dtype=values.dtype, device=values.device))
