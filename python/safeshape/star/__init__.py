"""STAR: token-level safety from a guardrail model (docs/math.md#star).

Scoring (``score_response``, ``StarScorer``) asks a guard about every prefix of a response, in one pass per
response (the ``shared`` engine) or one pass per prefix (``naive``); ``annotate_file`` stores the values with a
JSONL dataset; ``chunk_char_spans`` and ``token_weights`` map them onto a policy model's tokens for training.
``score_full_responses`` gives the guard's P(safe) of whole responses (the same exact rendering, for evaluation).
"""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "annotate_file": ".annotate", "load_guard": ".guard",
    "PRESET_NAMES": ".presets", "PRESETS": ".presets", "GuardPreset": ".presets", "get_preset": ".presets",
    "ENGINES": ".presets", "RECIPES": ".presets", "StarScorer": ".scoring", "score_response": ".scoring",
    "score_full_responses": ".scoring", "chunk_char_spans": "..chunks", "word_spans": "..chunks",
    "token_weights": "..chunks", "authors_token_weights": "..chunks",
})

__all__ = ["GuardPreset", "PRESETS", "PRESET_NAMES", "get_preset", "ENGINES", "RECIPES", "StarScorer",
           "score_response", "score_full_responses", "chunk_char_spans", "word_spans", "token_weights",
           "authors_token_weights", "load_guard", "annotate_file"]
