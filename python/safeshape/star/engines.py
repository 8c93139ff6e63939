"""The two STAR engines: verdict logits of every prefix of every response.

naive:  one guard pass per prefix (head + first k chunks + tail), prefixes batched with right padding.
shared: one pass per response over [head + all chunks + K copies of the tail]. Tail k attends to the head, the
        first k chunks and itself (a 4-D block mask) and takes the positions that follow chunk k, so its last
        token sees exactly what prefix k's last token sees in the naive pass: same logits, far fewer tokens.

Both read the verdict logits through the model's own output head (its lm_head and whatever the model applies after
it, e.g. Granite's logits scaling), on the selected positions only.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import SafeshapeError
from .template import GuardInput

# attention implementations of transformers that take a custom 4-D mask as given (eager adds a float mask;
# sdpa passes a bool or float mask to scaled_dot_product_attention); flash/flex attention build their own masks
BLOCK_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


def attention_implementation(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def block_mask_supported(model) -> bool:
    """Whether the shared engine's custom 4-D mask reaches this model's attention unchanged."""
    return attention_implementation(model) in BLOCK_MASK_IMPLEMENTATIONS


@contextmanager
def _output_head_on(model, rows: torch.Tensor, cols: torch.Tensor):
    """Run the model's output head only on hidden states [rows, cols] (as one [1, N, hidden] batch)."""
    head = model.get_output_embeddings()
    if head is None:
        raise SafeshapeError(f"{type(model).__name__} has no output embeddings (lm_head): not a causal LM guard")

    def gather(module, args):
        return (args[0][rows, cols].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _verdict_logits(model, ids, attention_mask, position_ids, rows, cols, verdict_ids) -> torch.Tensor:
    with _output_head_on(model, rows, cols), torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[0][:, verdict_ids].double()  # [N, 2]: (safe, unsafe)


def naive_logits(model, sequences: list[list[int]], verdict_ids: list[int], pad_id: int) -> tuple[torch.Tensor, int]:
    """Verdict logits [N, 2] of N full guard inputs, in one right-padded batch; and the padded slot count."""
    device = next(model.parameters()).device
    lens = torch.tensor([len(s) for s in sequences])
    width = int(lens.max())
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    mask = (torch.arange(width)[None, :] < lens[:, None]).long()
    pos = torch.arange(width).expand(len(sequences), -1)
    rows = torch.arange(len(sequences), device=device)
    logits = _verdict_logits(model, ids.to(device), mask.to(device), pos.to(device), rows, (lens - 1).to(device),
                             verdict_ids)
    return logits, ids.numel()


def shared_layout(gi: GuardInput):
    """One response's shared sequence: (ids, positions, segment, limit, read) as 1-D tensors / a list.

    segment[i] = 0 for head and response tokens, k for the tokens of tail k; limit[i] = how many leading tokens of
    the head+response block token i may see (i + 1 inside the block, head + first k chunks for tail k); read = the
    index of the last token of each tail (where prefix k's verdict is predicted).
    """
    body = list(gi.head)
    ends = []
    for c in gi.chunks:
        body.extend(c)
        ends.append(len(body))
    n_body, n_tail, k = len(body), len(gi.tail), len(gi.chunks)
    ids = torch.tensor(body + gi.tail * k, dtype=torch.long)
    ends_t = torch.tensor(ends, dtype=torch.long)
    j = torch.arange(n_tail, dtype=torch.long)
    tail_pos = (ends_t[:, None] + j[None, :]).reshape(-1)  # tail k continues from the end of chunk k
    pos = torch.cat([torch.arange(n_body, dtype=torch.long), tail_pos])
    seg = torch.cat([torch.zeros(n_body, dtype=torch.long),
                     torch.arange(1, k + 1, dtype=torch.long).repeat_interleave(n_tail)])
    limit = torch.cat([torch.arange(1, n_body + 1, dtype=torch.long), ends_t.repeat_interleave(n_tail)])
    read = [n_body + (i + 1) * n_tail - 1 for i in range(k)]
    return ids, pos, seg, limit, read


def block_mask(seg: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: token i sees token j iff j < limit[i], or i and j are in the same tail and j <= i.
    Padding (segment -1) sees itself and earlier padding only, so no row is empty."""
    L = seg.shape[1]
    j = torch.arange(L, device=seg.device)
    allowed = j[None, None, :] < limit[:, :, None]
    same_tail = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (j[None, None, :] <= j[None, :, None])
    return (allowed | same_tail)[:, None]


def shared_logits(model, inputs: list[GuardInput], verdict_ids: list[int], pad_id: int
                  ) -> tuple[list[torch.Tensor], int, int]:
    """Verdict logits ([K_b, 2] per response) of B responses in one padded batch; real tokens; padded slots."""
    device = next(model.parameters()).device
    layouts = [shared_layout(gi) for gi in inputs]
    width = max(int(l[0].numel()) for l in layouts)
    B = len(inputs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    seg = torch.full((B, width), -1, dtype=torch.long)
    limit = torch.zeros((B, width), dtype=torch.long)
    rows, cols = [], []
    for b, (i_, p_, s_, l_, read) in enumerate(layouts):
        n = i_.numel()
        ids[b, :n], pos[b, :n], seg[b, :n], limit[b, :n] = i_, p_, s_, l_
        rows += [b] * len(read)
        cols += read
    mask = block_mask(seg.to(device), limit.to(device))
    if attention_implementation(model) == "eager":  # eager attention adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    logits = _verdict_logits(model, ids.to(device), mask, pos.to(device), torch.tensor(rows, device=device),
                             torch.tensor(cols, device=device), verdict_ids)
    out, start = [], 0
    for gi in inputs:
        out.append(logits[start:start + len(gi.chunks)])
        start += len(gi.chunks)
    return out, sum(int(l[0].numel()) for l in layouts), ids.numel()
