"""Batched generation with the policy's chat template: left padding, the KV cache (Hugging Face ``generate``),
greedy by default, stopping at end of sequence.

Batches are fixed before any work is shared out: prompts sorted by token length (longest first, so a batch holds
prompts of similar length and little padding) and cut into ``batch_size`` groups. Under torchrun each process
takes whole batches (``sharded_map``), so every response comes from the same batch, with the same padding,
whatever the number of processes: the merged result equals a single process's.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import SafeshapeError


@dataclass
class Generation:
    response: str
    new_tokens: int  # generated tokens, the end-of-sequence token included
    finished: bool  # stopped at end of sequence (False: cut at max_new_tokens)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0  # sampling only: batch j draws from seed + j

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SafeshapeError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SafeshapeError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if not self.temperature >= 0:
            raise SafeshapeError(f"--temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise SafeshapeError(f"--top-p must be in (0, 1], got {self.top_p!r}")


def render_prompt(tokenizer, prompt: str, source: str = "the policy") -> list[int]:
    """Token ids of ``[user: prompt]`` through the policy's chat template with the generation prompt (the template
    writes any BOS itself, so no special tokens are added)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # jinja2 errors, the sandbox's SecurityError included, name nothing of ours
        raise SafeshapeError(f"{source}: the chat template failed on the prompt {prompt[:60]!r}: "
                             f"{type(exc).__name__}: {exc}") from exc
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_policy_tokenizer(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SafeshapeError(f"{source}: the tokenizer has no chat template (tokenizer_config.json `chat_template` "
                             "or chat_template.jinja); responses are generated with the policy's own template")
    if tokenizer.eos_token_id is None:
        raise SafeshapeError(f"{source}: the tokenizer has no eos_token: generation could not stop")
    render_prompt(tokenizer, "Hello", source)  # a template that cannot render fails now, before any model loads


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches: longest first (ties in input order), ``batch_size`` a batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS the model's generation config names (Llama 3 chat models stop at
    ``<|eot_id|>`` as well as ``<|end_of_text|>``)."""
    ids = [tokenizer.eos_token_id]
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    for i in ([extra] if isinstance(extra, int) else list(extra or [])):
        if i not in ids:
            ids.append(int(i))
    return ids


@torch.no_grad()
def generate_batch(model, tokenizer, batch: list[list[int]], settings: GenerationSettings,
                   seed: int | None = None) -> list[Generation]:
    """One left-padded batch through ``model.generate`` (KV cache on); responses decoded without special tokens."""
    eos = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(s) for s in batch)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in batch], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch], device=device)
    sample = settings.temperature > 0
    kwargs = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0) if sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sample:
        torch.manual_seed(settings.seed if seed is None else seed)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                         pad_token_id=pad, eos_token_id=eos, use_cache=True, **kwargs)
    results = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        toks = row if stop is None else row[:stop]
        text = tokenizer.decode(toks, skip_special_tokens=True).strip()
        results.append(Generation(text, len(toks) + (stop is not None), stop is not None))
    return results


def sharded_map(n_batches: int, work: Callable[[int], list], dist=None,
                on_done: Callable[[int, list], None] | None = None) -> list[list]:
    """``work(j)`` for batches ``j = 0..n_batches-1``, shared out over the processes of ``dist`` (process r runs
    r, r + W, ...), results gathered on every process in batch order; ``on_done(j, result)`` runs on every process
    as batches complete. An error in any process is raised in all of them (none is left waiting)."""
    world = dist.world_size if dist is not None and dist.enabled else 1
    rank = dist.rank if world > 1 else 0
    results: list = [None] * n_batches
    for start in range(0, n_batches, world):
        j = start + rank
        item: tuple = (j, None, None)
        if j < n_batches:
            try:
                item = (j, work(j), None)
            except Exception as exc:  # noqa: BLE001 -- any type: the other processes must not wait in the gather
                if world == 1:
                    raise
                why = str(exc) if isinstance(exc, SafeshapeError) else f"{type(exc).__name__}: {exc}"
                item = (j, None, f"process {rank}: {why}")
        gathered = dist.gather_objects(item) if world > 1 else [item]
        errors = [e for _, _, e in gathered if e]
        if errors:
            raise SafeshapeError("; ".join(errors))
        for jj, res, _ in gathered:
            if jj < n_batches:
                results[jj] = res
                if on_done is not None:
                    on_done(jj, res)
    return results


def generate_responses(model, tokenizer, prompts: Sequence[str], settings: GenerationSettings | None = None,
                       progress: bool = False, desc: str = "generate", dist=None, skip: Sequence[bool] | None = None,
                       on_batch: Callable[[list[int], list[Generation]], None] | None = None) -> list[Generation | None]:
    """The policy's response to each prompt (in input order), in length-sorted batches of ``settings.batch_size``.

    ``skip[i]`` leaves prompt i out (its result is None; a batch whose prompts are all skipped is not run).
    ``on_batch(indices, generations)`` is called (on every process) after each batch, in completion order, for
    saving as you go. ``dist`` (:class:`safeshape.distributed.Dist`) shares batches over processes."""
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    check_policy_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "tokenizer"))
    model.eval()
    ids = [render_prompt(tokenizer, p) for p in prompts]
    skip = list(skip) if skip is not None else [False] * len(ids)
    batches = [b for b in plan_batches([len(s) for s in ids], settings.batch_size) if not all(skip[i] for i in b)]
    # the sampling seed follows the batch's content, not its position in a resumed run
    seeds = [settings.seed + min(b) for b in batches]
    out: list[Generation | None] = [None] * len(ids)
    main = dist is None or dist.is_main
    bar = tqdm(total=sum(len(b) for b in batches), desc=desc, unit="prompt", disable=not progress or not main,
               dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    new_tokens = 0

    def done(j: int, gens: list[Generation]) -> None:
        nonlocal new_tokens
        for i, g in zip(batches[j], gens):
            out[i] = g
        new_tokens += sum(g.new_tokens for g in gens)
        bar.update(len(gens))
        bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
        if on_batch is not None:
            on_batch(batches[j], gens)

    try:
        sharded_map(len(batches), lambda j: generate_batch(model, tokenizer, [ids[i] for i in batches[j]], settings,
                                                           seeds[j]), dist, done)
    finally:
        bar.close()
    return out
