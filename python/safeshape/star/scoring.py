"""STAR scoring: P(safe) of every prefix of a response, from a guard model (docs/math.md#star-verdict-probability)."""
from __future__ import annotations

import warnings
from typing import Sequence, Union

import torch

from ..chunks import check_chunk_words
from ..errors import SafeshapeError
from . import engines
from .presets import ENGINES, RECIPES, GuardPreset, get_preset
from .recipe import authors_p_safe
from .template import GuardInput, GuardTemplate, guard_context

Conversation = Union[str, Sequence[dict]]


def as_context(prompt: Conversation) -> list[dict]:
    """The conversation before the response: a prompt string is one user message; a list of messages is kept."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    context = list(prompt)
    for i, m in enumerate(context):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SafeshapeError(f"prompt message {i}: each message must be a dict with string 'role' and 'content'")
    return context


def verdict_probability(logits: torch.Tensor, temperature: float) -> list[float]:
    """``softmax([l_safe, l_unsafe] / T)[0]`` for each row of ``logits`` [N, 2] (computed in float64)."""
    return torch.sigmoid((logits[:, 0] - logits[:, 1]) / temperature).tolist()


class StarScorer:
    """Scores responses with a guard: one P(safe) per chunk of M words.

    ``batch_size`` is the number of guard sequences per forward pass: prefixes for the naive engine, responses for
    the shared engine (each of which carries all its prefixes). ``tails`` picks how the shared engine runs the K
    template tails (see :mod:`safeshape.star.engines`): ``cached`` (default; a second pass of at most
    ``max_tail_rows`` tails attending to the cached head + response, which bounds its memory to that many copies
    of the head + response keys/values) or ``inline`` (one pass over everything with a dense block mask).
    Every prefix gets exactly the ids Hugging Face would feed the guard (see :mod:`safeshape.star.template`).
    ``guard_date`` pins the date a template prints (Granite Guardian 3.1); default today, fixed for the scorer's
    life and reported as ``self.template.guard_date``.

    ``stats`` accumulates the guard tokens processed (real tokens), padded slots, forward passes, responses and
    chunks; ``shared_fallbacks``: responses the shared engine scored one prefix at a time because their prefixes
    share too little with the body (the shared layout would cost more tokens than the naive one); and
    ``system_dropped``: responses whose conversation had a system message (not shown to the guard).
    """

    def __init__(self, guard, tokenizer, preset: str | GuardPreset = "llama-guard-3", chunk_words: int = 5,
                 engine: str = "shared", batch_size: int = 8, temperature: float = 1.0, tails: str = "cached",
                 max_tail_rows: int = 256, guard_date=None, recipe: str = "exact"):
        if tails not in ("cached", "inline"):
            raise SafeshapeError(f"tails must be 'cached' or 'inline', got {tails!r}")
        if engine not in ENGINES:
            raise SafeshapeError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if not temperature > 0:
            raise SafeshapeError(f"temperature must be > 0, got {temperature!r}")
        if recipe not in RECIPES:
            raise SafeshapeError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        if recipe == "authors" and temperature != 1.0:
            raise SafeshapeError("the authors' recipe has its own processors (temperature 0.2 among them); do not "
                                 "give a temperature with it")
        self.recipe = recipe
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SafeshapeError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.guard = guard
        self.template = GuardTemplate(tokenizer, get_preset(preset), guard_date=guard_date)
        self.chunk_words = check_chunk_words(chunk_words)
        self.batch_size = batch_size
        self.temperature = float(temperature)
        self.requested_engine = engine
        self.tails = tails
        self.max_tail_rows = max(1, int(max_tail_rows))
        self.engine = engine
        if engine == "shared" and not engines.block_mask_supported(guard):
            warnings.warn(f"STAR: the guard's attention implementation "
                          f"{engines.attention_implementation(guard)!r} cannot take a custom 4-D attention mask; "
                          "falling back to the naive engine (one guard pass per prefix). Load the guard with "
                          "attn_implementation='sdpa' or 'eager' to use the shared engine.", stacklevel=2)
            self.engine = "naive"
        if engine == "vllm" and getattr(guard, "recipe", None) != recipe:
            raise SafeshapeError(f"engine 'vllm' needs a safeshape.star.vllm_engine.VllmGuard made for the {recipe} "
                                 f"recipe, got {type(guard).__name__} (recipe {getattr(guard, 'recipe', None)!r})")
        if getattr(guard, "training", False):
            warnings.warn("STAR: the guard was in training mode; switching it to eval mode", stacklevel=2)
            guard.eval()
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0  # padded positions are masked out: any id will do
        self.verdict_ids = [self.template.safe_id, self.template.unsafe_id]
        # the authors' processors need every logit (repetition penalty, top-k, top-p); the exact recipe two
        self.columns = None if recipe == "authors" else self.verdict_ids
        self.stats = {"guard_tokens": 0, "guard_slots": 0, "forward_passes": 0, "responses": 0, "chunks": 0,
                      "shared_fallbacks": 0, "system_dropped": 0, "both_masked": 0}

    def build(self, prompt: Conversation, response: str) -> GuardInput:
        gi = self.template.build(as_context(prompt), response, self.chunk_words,
                                 normalize_whitespace=self.recipe == "authors")
        self.stats["system_dropped"] += gi.had_system
        return gi

    def score_inputs(self, inputs: list[GuardInput]) -> list[list[float]]:
        """P(safe) per chunk for prepared guard inputs."""
        if self.engine == "vllm":  # every prefix a request; the engine's prefix cache shares their heads
            flat = self._vllm_values([gi.prefix_ids(k) for gi in inputs for k in range(1, gi.num_prefixes + 1)])
            values, start = [], 0
            for gi in inputs:
                values.append(flat[start:start + gi.num_prefixes])
                start += gi.num_prefixes
            self.stats["responses"] += len(inputs)
            self.stats["chunks"] += sum(gi.num_prefixes for gi in inputs)
            return values
        if self.engine == "naive":
            logits = self._naive_logits(inputs)
        else:  # responses whose prefixes share too little with the body are cheaper one prefix at a time
            logits = [None] * len(inputs)
            fallback = [i for i, gi in enumerate(inputs) if gi.shared_tokens >= gi.naive_tokens]
            # a one-chunk response is one guard sequence either way: not a fallback
            self.stats["shared_fallbacks"] += sum(inputs[i].num_prefixes > 1 for i in fallback)
            for i, l in zip(fallback, self._naive_logits([inputs[i] for i in fallback])):
                logits[i] = l
            rest = [i for i, gi in enumerate(inputs) if gi.shared_tokens < gi.naive_tokens]
            for b0 in range(0, len(rest), self.batch_size):
                idx = rest[b0:b0 + self.batch_size]
                batch = [inputs[i] for i in idx]
                if self.tails == "cached":
                    out, tokens, slots, passes = engines.shared_logits(self.guard, batch, self.columns,
                                                                       self.pad_id, self.max_tail_rows)
                else:
                    out, tokens, slots = engines.shared_inline_logits(self.guard, batch, self.columns,
                                                                      self.pad_id)
                    passes = 1
                for i, l in zip(idx, out):
                    logits[i] = l
                self._count(tokens, slots, passes)
        self.stats["responses"] += len(inputs)
        self.stats["chunks"] += sum(gi.num_prefixes for gi in inputs)
        if self.recipe == "exact":
            return [verdict_probability(l, self.temperature) for l in logits]
        values = []
        for gi, l in zip(inputs, logits):
            v, both = authors_p_safe(l, [gi.prefix_ids(k) for k in range(1, gi.num_prefixes + 1)], *self.verdict_ids)
            self.stats["both_masked"] += both
            values.append(v)
        return values

    def _naive_logits(self, inputs: list[GuardInput]) -> list[torch.Tensor]:
        """Verdict logits [K, 2] per response, one guard sequence per prefix (``batch_size`` per pass)."""
        flat = self._sequence_logits([gi.prefix_ids(k) for gi in inputs for k in range(1, gi.num_prefixes + 1)])
        logits, start = [], 0
        for gi in inputs:
            logits.append(flat[start:start + gi.num_prefixes])
            start += gi.num_prefixes
        return logits

    def _sequence_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        flat = []
        for b0 in range(0, len(seqs), self.batch_size):
            batch = seqs[b0:b0 + self.batch_size]
            out, slots = engines.naive_logits(self.guard, batch, self.columns, self.pad_id)
            flat.append(out)
            self._count(sum(len(s) for s in batch), slots)
        return torch.cat(flat) if flat else torch.empty(0, 2, dtype=torch.float64)

    def full_response_ids(self, prompt: Conversation, response: str) -> list[int]:
        """The exact guard ids for the whole ``response`` (verbatim) after ``prompt``: the rendered template,
        tokenized, then the verdict prefix (what Hugging Face feeds the guard to judge the full response)."""
        context, had_system = guard_context(as_context(prompt), self.template.preset)
        self.stats["system_dropped"] += had_system
        self.template.split_template(context)  # content format, dropped-content and preset checks
        text = self.template.render(context, response)
        return self.template.tokenizer(text, add_special_tokens=False)["input_ids"] + self.template.verdict_prefix_ids

    def score_full(self, items: Sequence[tuple[Conversation, str]]) -> list[float]:
        """P(safe) of each whole response (one guard pass each; no prefixes)."""
        seqs = [self.full_response_ids(p, r) for p, r in items]
        if self.engine == "vllm":
            self.stats["responses"] += len(items)
            return self._vllm_values(seqs)
        logits = self._sequence_logits(seqs)
        self.stats["responses"] += len(items)
        if self.recipe == "exact":
            return verdict_probability(logits, self.temperature)
        values, both = authors_p_safe(logits, seqs, *self.verdict_ids)
        self.stats["both_masked"] += both
        return values

    def score(self, items: Sequence[tuple[Conversation, str]]) -> list[list[float]]:
        """P(safe) per chunk for each (prompt or conversation, response) pair."""
        return self.score_inputs([self.build(p, r) for p, r in items])

    def _vllm_values(self, seqs: list[list[int]]) -> list[float]:
        """P(safe) after each guard sequence from a :class:`~safeshape.star.vllm_engine.VllmGuard` (one request
        each, one call)."""
        tokens = sum(len(s) for s in seqs)
        self._count(tokens, tokens, 1 if seqs else 0)
        if self.recipe == "exact":
            return verdict_probability(self.guard.verdict_logits(seqs, self.verdict_ids), self.temperature)
        pairs, both = self.guard.authors_pairs(seqs, *self.verdict_ids)
        self.stats["both_masked"] += both
        return pairs.softmax(dim=1)[:, 0].tolist()

    def _count(self, tokens: int, slots: int, passes: int = 1) -> None:
        self.stats["guard_tokens"] += tokens
        self.stats["guard_slots"] += slots
        self.stats["forward_passes"] += passes


def score_response(guard, tokenizer, prompt: Conversation, response: str, chunk_words: int = 5,
                   engine: str = "shared", preset: str | GuardPreset = "llama-guard-3",
                   temperature: float = 1.0, guard_date=None, recipe: str = "exact") -> list[float]:
    """P(safe) of each prefix of ``response`` (one per chunk of ``chunk_words`` whitespace words, in order).

    ``prompt`` is the user prompt, or the list of messages before the response. ``preset`` is a
    :class:`GuardPreset` or a preset name. V_k = softmax([l_safe, l_unsafe] / temperature)[0], where l_safe and
    l_unsafe are the guard's logits of the verdicts' first tokens after its template and the preset's verdict prefix.
    The ``shared`` engine falls back to ``naive`` (with a warning) where the guard's attention cannot take a custom
    4-D mask. A response without words raises :class:`SafeshapeError`.
    """
    scorer = StarScorer(guard, tokenizer, preset=preset, chunk_words=chunk_words, engine=engine,
                        temperature=temperature, guard_date=guard_date, recipe=recipe)
    return scorer.score([(prompt, response)])[0]


def score_full_responses(guard, tokenizer, items: Sequence[tuple[Conversation, str]],
                         preset: str | GuardPreset = "llama-guard-3", batch_size: int = 8, temperature: float = 1.0,
                         guard_date=None, recipe: str = "exact") -> list[float]:
    """P(safe) the guard gives each whole response (``1 - value`` is P(unsafe)), for ``(prompt, response)`` pairs.

    The guard sees exactly what Hugging Face would feed it: its chat template on the conversation (system messages
    dropped; Granite Guardian: the last user message) + the verbatim response, tokenized, then the preset's verdict
    prefix; V = softmax([l_safe, l_unsafe] / temperature)[0] (``recipe="authors"``: after the STAR authors' logits
    processors, :mod:`safeshape.star.recipe`). ``guard_date`` pins the date a template prints.
    """
    scorer = StarScorer(guard, tokenizer, preset=preset, engine="naive", batch_size=batch_size,
                        temperature=temperature, guard_date=guard_date, recipe=recipe)
    return scorer.score_full(items)
