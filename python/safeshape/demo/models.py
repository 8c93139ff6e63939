"""Tiny Llama models for the demo: full-weight training of the base, aligned and guard models (generation and
scoring go through :mod:`safeshape.eval`).

LoRA fine-tuning is not done here: the demo's runs go through :mod:`safeshape.trainer`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .world import Example


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def policy_batch(tokenizer: PreTrainedTokenizerFast, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Chat-templated (prompt, response) rows; loss on the response tokens and the end-of-sequence token only."""
    ids, labels = [], []
    for ex in examples:
        msgs = [{"role": "user", "content": ex.prompt}]
        prompt = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)).input_ids
        full = tokenizer(tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": ex.response}], tokenize=False)).input_ids
        assert full[:len(prompt)] == prompt, "chat template: the prompt is not a prefix of the conversation"
        ids.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    input_ids = _pad_right(ids, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": (_pad_right([[1] * len(s) for s in ids], 0)),
            "labels": _pad_right(labels, -100)}


def guard_batch(tokenizer: PreTrainedTokenizerFast, rows: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    """(request, partial response, verdict) rows; the loss is on the verdict token only."""
    ids, labels = [], []
    for prompt, response, verdict in rows:
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        x = tokenizer(text + " " + verdict).input_ids
        ids.append(x)
        labels.append([-100] * (len(x) - 1) + x[-1:])
    return {"input_ids": _pad_right(ids, tokenizer.pad_token_id),
            "attention_mask": _pad_right([[1] * len(s) for s in ids], 0), "labels": _pad_right(labels, -100)}


def train_full(model: LlamaForCausalLM, batches: Iterator[dict[str, torch.Tensor]], steps: int, lr: float,
               desc: str, progress: bool = True, log: list | None = None) -> None:
    """AdamW on all weights, linear warm-up then cosine decay; the loss is the model's mean token cross-entropy."""
    from tqdm.auto import tqdm

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log is not None:
                log.append({"step": step, "loss": loss.item()})
    model.eval()


def batches_from(stream, make_batch, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield make_batch([next(stream) for _ in range(batch_size)])
