"""``safeshape eval``: safety and utility of a model and its fine-tunes (docs/math.md#evaluation-metrics).

- :func:`evaluate_model`: generate (batched, left padding, KV cache, greedy by default) and score one model in
  memory: refusal rate by keywords, harmful rate by a guard (:class:`GuardJudge`, through ``safeshape.star``),
  utility by exact match / containment. The demo's safety and utility numbers come from here.
- :func:`run_eval` / :class:`EvalConfig`: the command: base model + PEFT adapters side by side, responses saved
  and resumed, torchrun sharding, ``eval_report.json``, a table and a plot.
"""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "Generation": ".generate", "GenerationSettings": ".generate", "generate_responses": ".generate",
    "GuardJudge": ".judge", "REFUSAL_KEYWORDS": ".metrics", "is_refusal": ".metrics", "utility_correct": ".metrics",
    "Prompt": ".prompts", "UtilityItem": ".prompts", "load_prompts": ".prompts", "load_utility": ".prompts",
    "check_adapter": ".adapters", "ModelEval": ".evaluate", "evaluate_model": ".evaluate",
    "EvalConfig": ".run", "run_eval": ".run",
})

__all__ = ["Generation", "GenerationSettings", "generate_responses", "GuardJudge", "REFUSAL_KEYWORDS", "is_refusal",
           "utility_correct", "Prompt", "UtilityItem", "load_prompts", "load_utility", "EvalConfig", "ModelEval",
           "check_adapter", "evaluate_model", "run_eval"]
