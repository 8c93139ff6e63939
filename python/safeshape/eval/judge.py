"""Guard judging (docs/math.md#evaluation-metrics): P(unsafe) of each whole response, through :mod:`safeshape.star` (the presets, the
guard's own chat template, the verdict logits): the whole response is STAR's last prefix, so one chunk as long
as the response gives exactly its verdict."""
from __future__ import annotations

import time
from collections.abc import Sequence

from ..errors import SafeshapeError

# One chunk covers any response: its only prefix is the whole response.
_WHOLE = 1 << 40


class GuardJudge:
    """P(unsafe) = 1 - P(safe) of the guard's verdict on ``[user: prompt, assistant: response]``.

    An empty response (no words) is not shown to the guard: there is nothing in it to judge, and it is counted as
    safe (P(unsafe) = 0). ``stats`` counts responses judged, guard tokens and seconds.
    """

    def __init__(self, guard, tokenizer, preset="llama-guard-3", batch_size: int = 8, temperature: float = 1.0,
                 engine: str = "naive"):
        from ..star import StarScorer, get_preset

        if getattr(tokenizer, "chat_template", None) is None:
            raise SafeshapeError(f"guard tokenizer {getattr(tokenizer, 'name_or_path', '')!s}: no chat template "
                                 "(tokenizer_config.json 'chat_template' or chat_template.jinja); the guard is asked "
                                 "through its own template")
        # naive engine: with a single prefix it is one guard pass over exactly that prefix's input (or "vllm":
        # ``guard`` a safeshape.star.vllm_engine.VllmGuard, one request per response)
        self.scorer = StarScorer(guard, tokenizer, preset=preset, chunk_words=_WHOLE, engine=engine,
                                 batch_size=batch_size, temperature=temperature)
        self.batch_size = batch_size
        self.preset = get_preset(preset)
        self.stats = {"responses": 0, "empty": 0, "seconds": 0.0}

    def p_unsafe(self, items: Sequence[tuple[str, str]]) -> list[float]:
        """P(unsafe) for each (prompt, response) pair."""
        t = time.perf_counter()
        out = [0.0] * len(items)
        todo = [i for i, (_, r) in enumerate(items) if r.split()]
        if todo:
            values = self.scorer.score([items[i] for i in todo])
            for i, v in zip(todo, values):
                out[i] = 1.0 - v[-1]
        self.stats["responses"] += len(todo)
        self.stats["empty"] += len(items) - len(todo)
        self.stats["seconds"] += time.perf_counter() - t
        return out

    def summary(self) -> dict:
        s = dict(self.stats)
        s["guard_tokens"] = self.scorer.stats.get("guard_tokens", 0)
        s["tokenization_mismatches"] = self.scorer.stats.get("tokenization_mismatches", 0)
        s["responses_per_s"] = s["responses"] / s["seconds"] if s["seconds"] > 0 else None
        s["preset"] = self.preset.name
        return s
