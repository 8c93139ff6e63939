"""``safeshape eval``: safety and utility of a model and its fine-tunes (SPEC.md section 3b).

- :func:`evaluate_model`: generate (batched, left padding, KV cache, greedy by default) and score one model in
  memory: refusal rate by keywords, harmful rate by a guard (:class:`GuardJudge`, through ``safeshape.star``),
  utility by exact match / containment. The demo's safety and utility numbers come from here.
- :func:`run_eval` / :class:`EvalConfig`: the command: base model + PEFT adapters side by side, responses saved
  and resumed, torchrun sharding, ``eval_report.json``, a table and a plot.
"""
from .generate import Generation, GenerationSettings, generate_responses
from .judge import GuardJudge
from .metrics import REFUSAL_KEYWORDS, is_refusal, utility_correct
from .prompts import Prompt, UtilityItem, load_prompts, load_utility
from .adapters import check_adapter
from .evaluate import ModelEval, evaluate_model
from .run import EvalConfig, run_eval

__all__ = ["Generation", "GenerationSettings", "generate_responses", "GuardJudge", "REFUSAL_KEYWORDS", "is_refusal",
           "utility_correct", "Prompt", "UtilityItem", "load_prompts", "load_utility", "EvalConfig", "ModelEval",
           "check_adapter", "evaluate_model", "run_eval"]
