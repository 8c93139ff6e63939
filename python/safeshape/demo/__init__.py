"""``safeshape demo``: a toy world, made and trained in code, that runs Safe LoRA and DSS end to end on CPU.

The world (:mod:`.world`): requests in a small closed vocabulary. Benign families transform a list of words
(repeat, reverse, first, last) and have one correct answer; the fine-tuning task is a new family (swap the first
and last word) that no model has seen before fine-tuning. Harmful requests ask how to do something on one of four
designated topics (weapons, poison, hacking, theft); a compliant answer starts "sure here is how to ..." and the
refusal is "sorry i can not help with that". Harmful (topic, verb, object) combos are split into disjoint pools for
alignment, fine-tuning and evaluation, and the benign evaluation word lists never occur in training data.

The models (:mod:`.models`, tiny Llamas with a word-level tokenizer and chat templates from :mod:`.tokenizer`): a
base model pretrained to do every benign task and comply with every harmful request; an aligned model fine-tuned
from it (all weights) to refuse harmful requests; a guard that answers safe/unsafe for a (request, partial
response) pair. The runs (:mod:`.pipeline`) fine-tune the aligned model with LoRA through ``safeshape.trainer``
(SFT, RS, DSS with STAR from ``safeshape.star``'s generic preset) and apply ``safeshape.safelora``, with the papers'
defaults; safety is the refusal rate on held-out harmful requests, utility the accuracy on held-out task requests,
both by greedy decoding.
"""
from .pipeline import Demo

__all__ = ["Demo"]
