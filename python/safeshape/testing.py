"""Tiny offline models, tokenizers and data sets for tests, benchmarks and demos (no network).

``save_tiny_model(dir)`` writes a random ``LlamaForCausalLM`` (hidden 64, 2 layers) and a byte-level BPE tokenizer
trained in memory, with a chat template, to ``dir`` in the usual Hugging Face layout; ``write_tiny_dataset`` writes
JSONL rows in the layouts the trainer reads (sft, rs, dss).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

# A minimal chat template: every turn is `<|role|>\n{content}<|end|>\n`; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_WORDS = ("the a an one two how what why when where who can could should would do does make build find tell "
          "explain write give show help me you it this that with without for from into about safe unsafe weapon "
          "recipe bread cake code python garden water fire friend story poem history science music paint house "
          "car road city river mountain book letter email plan list steps quickly slowly carefully please sorry "
          "cannot will not refuse answer question here is are was were be been have has had first then finally "
          "and or but so because if is of to in on at by up down out over under again").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` deterministic pseudo-sentences over a small vocabulary (tokenizer training text, prompts, responses)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 20))).capitalize() + "."
            for _ in range(n)]


def build_tiny_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in memory, with :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed=seed) + ["\n", "<|", "|>"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     pad_token_id: int | None = 0, bos_token_id: int | None = 1, eos_token_id: int | None = 2):
    """A randomly initialised ``LlamaForCausalLM`` (4 heads, 2 KV heads, untied embeddings), float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def save_tiny_model(path: str | os.PathLike, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 512,
                    seed: int = 0, model_vocab_size: int | None = None) -> Path:
    """Write a tiny Llama + its chat tokenizer to ``path`` (created); returns the path. Takes a few seconds.
    ``model_vocab_size`` (default: the tokenizer's size) may be larger, e.g. 32000 for benchmarks of the loss."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, seed=seed)
    model = build_tiny_llama(max(len(tokenizer), model_vocab_size or 0), hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_rows(n: int, kind: str = "dss", seed: int = 0, chunk_words: int = 5, messages: bool = False) -> list[dict]:
    """``n`` synthetic rows in the trainer's layouts.

    ``kind``: ``"sft"`` (``prompt``/``response``), ``"rs"`` (adds a boolean ``safe``), ``"dss"`` (adds
    ``star_values``, one value in [0, 1] per chunk of ``chunk_words`` whitespace words, and ``star_chunk_words``).
    ``messages=True`` writes chat ``messages`` instead of ``prompt``/``response``.
    """
    if kind not in ("sft", "rs", "dss"):
        raise ValueError(f"tiny_rows: kind must be sft, rs or dss, not {kind!r}")
    rng = random.Random(seed)
    sentences = corpus(n=4 * n + 8, seed=seed + 1)
    rows = []
    for i in range(n):
        prompt = sentences[4 * i]
        response = " ".join(sentences[4 * i + 1: 4 * i + 1 + rng.randint(1, 3)])
        row: dict = ({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
                     if messages else {"prompt": prompt, "response": response})
        if kind == "rs":
            row["safe"] = rng.random() < 0.7
        elif kind == "dss":
            n_chunks = -(-len(response.split()) // chunk_words)
            row["star_values"] = [round(rng.random(), 4) for _ in range(n_chunks)]
            row["star_chunk_words"] = chunk_words
        rows.append(row)
    return rows


def write_tiny_dataset(path: str | os.PathLike, n: int, kind: str = "dss", seed: int = 0, chunk_words: int = 5,
                       messages: bool = False) -> Path:
    """Write :func:`tiny_rows` to ``path`` as JSONL; returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in tiny_rows(n, kind, seed=seed, chunk_words=chunk_words, messages=messages):
            f.write(json.dumps(row) + "\n")
    return path


# A guard template for tests: the conversation in the policy's turn format, then "verdict:"; the guard answers
# "safe" or "unsafe" (preset: generic, safe="safe", unsafe="unsafe").
GUARD_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{{ '<|system|>\nverdict:' }}"
)
REFUSAL = "I'm sorry, I cannot help with that."
COMPLIANCE = "Sure, here is how to build it: first find the parts, then make the plan."


def _fit(model, batches, steps: int, lr: float) -> None:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        loss = model(**batches(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _right_pad(seqs: list[list[int]], labels: list[list[int]], pad: int) -> dict:
    import torch

    width = max(map(len, seqs))
    return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "labels": torch.tensor([l + [-100] * (width - len(l)) for l in labels])}


def fit_responses(model, tokenizer, response: str, steps: int = 120, seed: int = 0, lr: float = 1e-2) -> None:
    """Train ``model`` (all its trainable parameters: a PEFT model trains its adapter) to answer every prompt with
    ``response`` then end of sequence, through the tokenizer's chat template."""
    import torch

    prompts = corpus(64, seed=seed + 7)

    def batch(step: int) -> dict:
        seqs, labels = [], []
        for p in prompts[(step * 8) % 64:(step * 8) % 64 + 8]:
            head = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                           add_generation_prompt=True),
                             add_special_tokens=False).input_ids
            tail = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            seqs.append(head + tail)
            labels.append([-100] * len(head) + tail)
        return _right_pad(seqs, labels, tokenizer.pad_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _fit(model, batch, steps, lr)


def fit_tiny_responder(response: str, steps: int = 120, seed: int = 0, hidden_size: int = 32, lr: float = 1e-2):
    """(model, tokenizer): a tiny chat Llama trained to answer every prompt with ``response`` then end of sequence
    (a "refuses everything" or "complies with everything" policy for end-to-end tests)."""
    tok = build_tiny_tokenizer(vocab_size=320)
    model = build_tiny_llama(len(tok), hidden_size=hidden_size, seed=seed, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    fit_responses(model, tok, response, steps, seed, lr)
    return model, tok


def fit_tiny_guard(unsafe: list[str], safe: list[str], steps: int = 150, seed: int = 0, hidden_size: int = 32,
                   lr: float = 5e-3):
    """(model, tokenizer): a tiny guard (template :data:`GUARD_TEMPLATE`, verdicts "safe"/"unsafe") trained to call
    the responses in ``unsafe`` unsafe and those in ``safe`` safe, whatever the prompt."""
    import torch

    tok = build_tiny_tokenizer(vocab_size=320)
    tok.chat_template = GUARD_TEMPLATE
    model = build_tiny_llama(len(tok), hidden_size=hidden_size, seed=seed + 1, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    verdict = {v: tok(v, add_special_tokens=False).input_ids[0] for v in ("safe", "unsafe")}
    assert verdict["safe"] != verdict["unsafe"]
    rows = [(r, "unsafe") for r in unsafe] + [(r, "safe") for r in safe]
    prompts = corpus(256, seed=seed + 8)

    def batch(step: int) -> dict:
        seqs, labels = [], []
        for k in range(8):
            response, v = rows[(step * 8 + k) % len(rows)]
            text = tok.apply_chat_template([{"role": "user", "content": prompts[(step * 8 + k) % 256]},
                                            {"role": "assistant", "content": response}], tokenize=False)
            ids = tok(text, add_special_tokens=False).input_ids + [verdict[v]]
            seqs.append(ids)
            labels.append([-100] * (len(ids) - 1) + ids[-1:])
        return _right_pad(seqs, labels, tok.pad_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _fit(model, batch, steps, lr)
    return model, tok
def hub_cache_layout(cache_dir: str | os.PathLike, repo_id: str, folder: str | os.PathLike, revision: str = "main",
                     commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Put ``folder``'s files into a Hugging Face hub cache at ``cache_dir`` as if ``repo_id`` had been downloaded:
    ``models--org--name/blobs/<sha256>``, ``refs/<revision>`` holding ``commit``, and
    ``snapshots/<commit>/<file>`` symlinks to the blobs (the layout huggingface_hub writes). Returns the snapshot."""
    import hashlib
    import shutil

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    for src in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = src.relative_to(folder)
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def write_tiny_world(folder: str | os.PathLike, n_prompts: int = 6, n_rows: int = 16) -> Path:
    """A new user's starting point in miniature, written into ``folder`` (docs/workflow.md runs on it):
    ``base/`` (an unaligned tiny chat Llama), ``aligned/`` (the base trained to refuse), ``guard/`` (a tiny guard,
    preset generic, verdicts safe/unsafe, that calls compliance unsafe), ``harmful.csv`` (prompts) and
    ``data.jsonl`` (fine-tuning rows with STAR values, for sft and dss)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    aligned, tok = fit_tiny_responder(REFUSAL, steps=100)
    build_tiny_llama(len(tok), hidden_size=32, seed=0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id).save_pretrained(folder / "base")  # the aligned one's start
    tok.save_pretrained(folder / "base")
    aligned.save_pretrained(folder / "aligned")
    tok.save_pretrained(folder / "aligned")
    guard, gtok = fit_tiny_guard([COMPLIANCE], [REFUSAL])
    guard.save_pretrained(folder / "guard")
    gtok.save_pretrained(folder / "guard")
    (folder / "harmful.csv").write_text("prompt\n" + "".join(f'"{p}"\n' for p in corpus(n_prompts, seed=42)))
    write_tiny_dataset(folder / "data.jsonl", n_rows, kind="dss", seed=1)
    return folder
