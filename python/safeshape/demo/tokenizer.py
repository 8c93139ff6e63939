"""A word-level tokenizer for the demo world, built in code, with the policy's and the guard's chat templates.

Words are split on whitespace only, so a text's tokens are the same whether it is tokenized whole or in
whitespace-aligned pieces (what STAR's shared engine and the trainer's prompt masking rely on), and character
offsets map each token to its word.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .world import vocabulary

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
ROLE_WORDS = ["<user>", "<assistant>"]
GUARD_WORDS = ["<judge>", "verdict", "safe", "unsafe"]

# Policy: "<s> <user> PROMPT <assistant> RESPONSE </s>"; the generation prompt ends after "<assistant> ".
POLICY_TEMPLATE = (
    "{{ bos_token }} "
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %} <user> {{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' %} <assistant> {{ m['content'] }} {{ eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %} <assistant> {% endif %}"
)

# Guard: the conversation to judge inside one guard prompt; the verdict ("safe"/"unsafe") is the next token.
GUARD_TEMPLATE = (
    "{{ bos_token }} <judge>"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %} <user> {{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' %} <assistant> {{ m['content'] }}"
    "{%- endif %}"
    "{%- endfor %} verdict"
)
GUARD_SAFE, GUARD_UNSAFE, GUARD_VERDICT_PREFIX = "safe", "unsafe", ""


def build_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    words = list(SPECIAL.values()) + ROLE_WORDS + GUARD_WORDS
    words += [w for w in vocabulary() if w not in words]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL, chat_template=chat_template)
    fast.padding_side = "left"  # batched greedy decoding
    return fast


def policy_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(POLICY_TEMPLATE)


def guard_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(GUARD_TEMPLATE)
