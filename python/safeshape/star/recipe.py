"""The STAR authors' verdict distribution (docs/math.md#star-authors-recipe), for reproducing their numbers.

Their scripts read ``generate(...).scores`` with ``do_sample=True, temperature=0.2, top_k=50, top_p=0.9,
repetition_penalty=1.2``: the next-token logits after Hugging Face's logits processors, in generate's order
(repetition penalty on every token already in the input, then /temperature, then top-k and top-p masking to -inf),
and V = softmax of the processed [safe, unsafe] scores. Where both verdict tokens are masked their code gets NaN;
here V falls back to the softmax of the two scores before the masking (after penalty and temperature) and the
position is counted (``both_masked``).
"""
from __future__ import annotations

import torch

REPETITION_PENALTY = 1.2
TEMPERATURE = 0.2
TOP_K = 50
TOP_P = 0.9


def processed_scores(logits: torch.Tensor, input_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores after repetition penalty and temperature, the same after top-k and top-p masking), each [N, vocab],
    for next-token ``logits`` [N, vocab] of N guard inputs ``input_ids`` (the penalty's "tokens already seen")."""
    scores = logits.clone()
    for i, ids in enumerate(input_ids):  # RepetitionPenaltyLogitsProcessor
        seen = torch.tensor(sorted(set(ids)), dtype=torch.long, device=scores.device)
        s = scores[i, seen]
        scores[i, seen] = torch.where(s < 0, s * REPETITION_PENALTY, s / REPETITION_PENALTY)
    scores = scores / TEMPERATURE  # TemperatureLogitsWarper
    unmasked = scores
    kth = torch.topk(scores, min(TOP_K, scores.shape[-1]), dim=-1).values[:, -1:]  # TopKLogitsWarper
    scores = scores.masked_fill(scores < kth, float("-inf"))
    sorted_scores, order = torch.sort(scores, descending=False)  # TopPLogitsWarper
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - TOP_P)
    remove[:, -1:] = False  # min_tokens_to_keep = 1
    scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return unmasked, scores


def authors_p_safe(logits: torch.Tensor, input_ids: list[list[int]], safe_id: int, unsafe_id: int
                   ) -> tuple[list[float], int]:
    """(V per row, how many rows had both verdict tokens masked) under the authors' processors."""
    unmasked, masked = processed_scores(logits, input_ids)
    pair = masked[:, [safe_id, unsafe_id]]
    both = torch.isinf(pair).all(dim=1)
    pair = torch.where(both[:, None], unmasked[:, [safe_id, unsafe_id]], pair)
    return pair.softmax(dim=1)[:, 0].tolist(), int(both.sum())
