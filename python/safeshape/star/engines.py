"""The two STAR engines: verdict logits of every prefix of every response.

naive:  one guard pass per prefix (its exact ids, see template.py), prefixes batched with right padding.
shared: every token of [body (head + response) + K tails] is computed once. Tail k (prefix k's ids after the part
        they share with the body: re-tokenized boundary tokens, template tail, verdict prefix) attends to its shared
        part of the body and itself (a 4-D block mask) and takes the positions that follow it, so its last token
        sees exactly what prefix k's last token sees in the naive pass: same logits, far fewer tokens.
        Two ways to run it:
        - "cached" (default): one pass over head + response (causal, keys/values kept), then one pass over the K
          tails as K rows of a batch, each attending to the cached head + response through a [K, 1, T, P + T]
          block mask. Attention work is P^2 + K T (P + T).
        - "inline": literally one pass over the whole [P + K T] sequence with a [P + K T]^2 block mask. Same
          result; dense attention computes the masked-out tail-to-tail blocks too, (P + K T)^2, which dominates
          for small guards on long responses.

Both read the verdict logits through the model's own output head (its lm_head and whatever the model applies after
it, e.g. Granite's logits scaling), on the selected positions only.
"""
from __future__ import annotations

import inspect
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


def _cache_kwarg(model) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use the name this model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _verdict_logits(model, ids, attention_mask, position_ids, rows, cols, verdict_ids, cache=None):
    """Verdict logits [N, 2] (float64) at [rows, cols]; with ``cache`` given, the forward attends to it too."""
    extra = {_cache_kwarg(model): cache, "use_cache": True} if cache is not None else {"use_cache": False}
    with _output_head_on(model, rows, cols), torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, **extra)
    logits = out.logits[0]
    # [N, 2]: (safe, unsafe); or every column [N, vocab] when verdict_ids is None (the authors' recipe)
    return (logits if verdict_ids is None else logits[:, verdict_ids]).double()


def _key_values(model, ids, attention_mask, position_ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a causal pass over ids (the output head runs on one position only)."""
    zero = torch.zeros(1, dtype=torch.long, device=ids.device)
    with _output_head_on(model, zero, zero), torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else out.past_key_values
    if hasattr(cache, "layers"):  # transformers 5
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _cache_of(key_values):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(key_values):
        cache.update(k, v, i)
    return cache


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

    The body (head + response) comes first, then the K tails. segment[i] = 0 for body tokens, k for the tokens of
    tail k; limit[i] = how many leading body tokens token i may see (i + 1 inside the body, ``gi.shared[k]`` for
    tail k); read = the index of the last token of each tail (where prefix k's verdict is predicted).
    """
    n_body, k = len(gi.body), gi.num_prefixes
    ids = torch.tensor(gi.body + [t for tail in gi.tails for t in tail], dtype=torch.long)
    pos, seg, limit, read = [torch.arange(n_body)], [torch.zeros(n_body, dtype=torch.long)], \
        [torch.arange(1, n_body + 1)], []
    at = n_body
    for i, (shared, tail) in enumerate(zip(gi.shared, gi.tails)):
        n = len(tail)
        pos.append(shared + torch.arange(n))  # tail k continues from its shared part of the body
        seg.append(torch.full((n,), i + 1, dtype=torch.long))
        limit.append(torch.full((n,), shared, dtype=torch.long))
        at += n
        read.append(at - 1)
    return ids, torch.cat(pos).long(), torch.cat(seg), torch.cat(limit).long(), read


def block_mask(seg: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: token i sees token j iff j < limit[i], or i and j are in the same tail and j <= i.
    Padding (segment -1) sees itself and earlier padding only, so no row is empty."""
    L = seg.shape[1]
    j = torch.arange(L, device=seg.device)
    allowed = j[None, None, :] < limit[:, :, None]
    same_tail = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (j[None, None, :] <= j[None, :, None])
    return (allowed | same_tail)[:, None]


def shared_inline_logits(model, inputs: list[GuardInput], verdict_ids: list[int], pad_id: int
                         ) -> tuple[list[torch.Tensor], int, int]:
    """Verdict logits ([K_b, 2] per response) of B responses in one padded batch, each response one sequence of
    head + chunks + K tails under the block mask; real tokens; padded slots."""
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
    return _per_response(logits, inputs), sum(int(l[0].numel()) for l in layouts), ids.numel()


def _per_response(logits: torch.Tensor, inputs: list[GuardInput]) -> list[torch.Tensor]:
    out, start = [], 0
    for gi in inputs:
        out.append(logits[start:start + gi.num_prefixes])
        start += gi.num_prefixes
    return out


def shared_logits(model, inputs: list[GuardInput], verdict_ids: list[int], pad_id: int, max_tail_rows: int = 256
                  ) -> tuple[list[torch.Tensor], int, int, int]:
    """Verdict logits ([K_b, 2] per response) of B responses: one causal pass over the B heads + responses (right
    padded), then the tails of all of them as rows of a batch (at most ``max_tail_rows`` per pass) that attend to
    the cached keys/values; returns the logits, real tokens, padded slots and forward passes."""
    device = next(model.parameters()).device
    bodies = [gi.body for gi in inputs]
    limits = [n for gi in inputs for n in gi.shared]  # tail k sees the first shared[k] body tokens
    owners = [b for b, gi in enumerate(inputs) for _ in gi.tails]
    tail_ids = [t for gi in inputs for t in gi.tails]
    lens = torch.tensor([len(x) for x in bodies])
    width = int(lens.max())
    ids = torch.full((len(bodies), width), pad_id, dtype=torch.long)
    for b, body in enumerate(bodies):
        ids[b, : len(body)] = torch.tensor(body)
    mask = (torch.arange(width)[None, :] < lens[:, None]).long()
    pos = torch.arange(width).expand(len(bodies), -1)
    kv = _key_values(model, ids.to(device), mask.to(device), pos.to(device))
    slots = ids.numel()

    n_rows = len(tail_ids)
    limit = torch.tensor(limits, dtype=torch.long)
    owner = torch.tensor(owners, dtype=torch.long, device=device)
    eager = attention_implementation(model) == "eager"
    dtype = next(model.parameters()).dtype
    out = []
    for r0 in range(0, n_rows, max_tail_rows):
        r1 = min(n_rows, r0 + max_tail_rows)
        rows_tails = tail_ids[r0:r1]
        tail_lens = torch.tensor([len(t) for t in rows_tails])
        n_tail = int(tail_lens.max())
        tails = torch.full((r1 - r0, n_tail), pad_id, dtype=torch.long)  # right padded: pads are never read
        for i, t in enumerate(rows_tails):
            tails[i, : len(t)] = torch.tensor(t)
        tail_causal = torch.ones(n_tail, n_tail, dtype=torch.bool).tril()
        body_visible = torch.arange(width)[None, :] < limit[r0:r1, None]  # [n, width]
        block = torch.cat([body_visible[:, None, :].expand(-1, n_tail, -1),
                           tail_causal.expand(r1 - r0, -1, -1)], dim=2)[:, None].to(device)
        if eager:  # eager attention adds the mask to the scores
            block = torch.zeros(block.shape, dtype=dtype, device=device).masked_fill_(~block, torch.finfo(dtype).min)
        tail_pos = (limit[r0:r1, None] + torch.arange(n_tail)[None, :]).to(device)
        cache = _cache_of([(k.index_select(0, owner[r0:r1]), v.index_select(0, owner[r0:r1])) for k, v in kv])
        rows = torch.arange(r1 - r0, device=device)
        out.append(_verdict_logits(model, tails.to(device), block, tail_pos, rows, (tail_lens - 1).to(device),
                                   verdict_ids, cache=cache))
        slots += tails.numel()
    logits = torch.cat(out)
    tokens = int(lens.sum()) + sum(len(t) for t in tail_ids)
    return _per_response(logits, inputs), tokens, slots, 1 + len(out)
