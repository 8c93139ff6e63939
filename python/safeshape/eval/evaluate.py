"""Evaluating one model in memory: generate, judge, score. What ``safeshape eval`` runs per model and what the demo
calls (:func:`evaluate_model`)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .generate import Generation, GenerationSettings, generate_responses, sharded_map
from .judge import GuardJudge
from .metrics import is_refusal, safety_summary, utility_summary
from .prompts import Prompt, UtilityItem


@dataclass
class ModelEval:
    """Responses and scores of one model."""
    harmful_responses: list[str]
    utility_responses: list[str]
    safety: dict  # metrics.safety_summary
    utility: dict | None  # metrics.utility_summary
    p_unsafe: list[float] | None = None
    generation: dict = field(default_factory=dict)

    @property
    def refusal_rate(self) -> float | None:
        return self.safety["refusal_rate"]

    @property
    def harmful_rate(self) -> float | None:
        return self.safety["harmful_rate"]

    @property
    def utility_accuracy(self) -> float | None:
        return self.utility["accuracy"] if self.utility else None


def _as_prompts(items: Sequence[str | Prompt]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt(p) for p in items]


def _as_utility(items: Sequence[UtilityItem | tuple[str, str]]) -> list[UtilityItem]:
    return [u if isinstance(u, UtilityItem) else UtilityItem(u[0], u[1]) for u in items]


def judge_responses(judge: GuardJudge, prompts: Sequence[str], responses: Sequence[str], dist=None) -> list[float]:
    """P(unsafe) of each (prompt, response), in fixed batches of the judge's batch size shared over processes."""
    b = judge.batch_size
    n = len(prompts)
    parts = sharded_map(-(-n // b), lambda j: judge.p_unsafe(list(zip(prompts[j * b:(j + 1) * b],
                                                                      responses[j * b:(j + 1) * b]))), dist)
    return [p for part in parts for p in part]


def score(harmful: Sequence[Prompt], harmful_responses: Sequence[str], utility: Sequence[UtilityItem],
          utility_responses: Sequence[str], p_unsafe: Sequence[float] | None,
          refusal: Callable[[str], bool] = is_refusal) -> tuple[dict, dict | None]:
    """(safety summary, utility summary or None) of one model's responses."""
    safety = safety_summary(harmful_responses, [p.category for p in harmful], p_unsafe, refusal)
    util = utility_summary(utility_responses, [u.answer for u in utility], [u.metric for u in utility]) \
        if utility else None
    return safety, util


def evaluate_model(model, tokenizer, harmful: Sequence[str | Prompt], utility: Sequence[UtilityItem | tuple] = (),
                   judge: GuardJudge | None = None, refusal: Callable[[str], bool] = is_refusal,
                   settings: GenerationSettings | None = None, progress: bool = False) -> ModelEval:
    """Generate (greedy by default, batched, left padding, KV cache) and score one model in memory.

    ``harmful``: prompts (strings or :class:`Prompt`); ``utility``: ``(prompt, answer)`` pairs or
    :class:`UtilityItem` (exact match by default); ``judge``: a :class:`GuardJudge` for the harmful rate;
    ``refusal``: the refusal test (default: the keyword list)."""
    harmful, utility = _as_prompts(harmful), _as_utility(utility)
    t = time.perf_counter()
    gens = generate_responses(model, tokenizer, [p.text for p in harmful] + [u.prompt for u in utility], settings,
                              progress=progress)
    seconds = time.perf_counter() - t
    responses = [g.response for g in gens]
    h, u = responses[:len(harmful)], responses[len(harmful):]
    p_unsafe = judge_responses(judge, [p.text for p in harmful], h) if judge is not None else None
    safety, util = score(harmful, h, utility, u, p_unsafe, refusal)
    return ModelEval(h, u, safety, util, p_unsafe, throughput(gens, seconds))


def throughput(gens: Sequence[Generation], seconds: float) -> dict:
    tokens = sum(g.new_tokens for g in gens)
    return {"prompts": len(gens), "new_tokens": tokens, "seconds": round(seconds, 3),
            "prompts_per_s": len(gens) / seconds if seconds > 0 and gens else None,
            "tokens_per_s": tokens / seconds if seconds > 0 and gens else None,
            "unfinished": sum(not g.finished for g in gens)}
