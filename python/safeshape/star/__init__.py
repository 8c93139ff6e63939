"""STAR: token-level safety from a guardrail model (SPEC.md section 2).

Scoring (``score_response``, ``StarScorer``) asks a guard about every prefix of a response, in one pass per
response (the ``shared`` engine) or one pass per prefix (``naive``); ``annotate_file`` stores the values with a
JSONL dataset; ``chunk_char_spans`` and ``token_weights`` map them onto a policy model's tokens for training.
``score_full_responses`` gives the guard's P(safe) of whole responses (the same exact rendering, for evaluation).
"""
from .annotate import annotate_file
from .guard import load_guard
from .presets import PRESET_NAMES, PRESETS, GuardPreset, get_preset
from .scoring import ENGINES, StarScorer, score_full_responses, score_response
from .recipe import RECIPES
from .segment import chunk_char_spans, word_spans
from .weights import authors_token_weights, token_weights

__all__ = ["GuardPreset", "PRESETS", "PRESET_NAMES", "get_preset", "ENGINES", "RECIPES", "StarScorer",
           "score_response", "score_full_responses", "chunk_char_spans", "word_spans", "token_weights",
           "authors_token_weights", "load_guard", "annotate_file"]
