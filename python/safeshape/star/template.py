"""Guard inputs as token ids: the template head, the response in chunks, the template tail.

The guard input for prefix k is the guard's chat template on ``[conversation..., assistant: prefix k]`` followed by
the preset's verdict prefix. The template is rendered once with a placeholder for the assistant message, which
splits it into a head (policy text + conversation so far) and a tail (the text after the assistant message), the
same for every prefix; the renderings of the shortest and the full prefix are checked against head + prefix + tail.

Tokenization (the subtlety): the text of prefix k tokenized on its own need not equal the first tokens of the full
response's tokenization, because BPE can merge across the chunk boundary. Both engines therefore use ONE token
sequence per response: the head, each chunk tokenized on its own, the tail. Chunk boundaries are token boundaries,
prefix k's tokens are exactly the first k chunks' tokens, and the naive and shared engines see identical tokens.
Chunk k > 1 starts with the whitespace that precedes its first word, and the spaces that end the head (Llama
Guard's ``"Agent: "``) move into chunk 1, because byte-level BPE pre-tokenizers (Llama 3, Granite, GPT-2) attach
a space to the word after it: so for ordinary prose this sequence is the one the guard's tokenizer gives the whole
rendered text (``GuardInput.matches_full_text`` records whether it did).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SafeshapeError
from .presets import GuardPreset
from .segment import chunk_char_spans, prefix_text

_PLACEHOLDER = "\ue000STAR-RESPONSE\ue001"


@dataclass
class GuardInput:
    """Token ids of the guard inputs of every prefix of one response: prefix k is
    ``head + chunks[0] + ... + chunks[k-1] + tail``."""

    head: list[int]
    chunks: list[list[int]]
    tail: list[int]
    matches_full_text: bool  # the full prefix's sequence equals the tokenization of its rendered text in one go

    def prefix_ids(self, k: int) -> list[int]:
        ids = list(self.head)
        for c in self.chunks[:k]:
            ids.extend(c)
        return ids + self.tail


def _as_content(text: str, content_format: str) -> Any:
    return [{"type": "text", "text": text}] if content_format == "parts" else text


def _render(tokenizer, context: list[dict], assistant_text: str, preset: GuardPreset, content_format: str) -> str:
    messages = [{**m, "content": _as_content(m["content"], content_format)} for m in context]
    messages.append({"role": "assistant", "content": _as_content(assistant_text, content_format)})
    kwargs = {"add_generation_prompt": True, **preset.template_kwargs}
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


class GuardTemplate:
    """A guard tokenizer + preset: builds :class:`GuardInput` for (conversation, response) pairs."""

    def __init__(self, tokenizer, preset: GuardPreset):
        if getattr(tokenizer, "chat_template", None) is None:
            raise SafeshapeError(f"the guard tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                                 "template: STAR needs the guard's own chat template")
        self.tokenizer = tokenizer
        self.preset = preset
        self._content_format = None if preset.content_format == "auto" else preset.content_format
        self.safe_id, self.unsafe_id = self._verdict_ids()

    def _verdict_ids(self) -> tuple[int, int]:
        ids = []
        for name, text in (("safe", self.preset.safe), ("unsafe", self.preset.unsafe)):
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not toks:
                raise SafeshapeError(f"preset {self.preset.name!r}: {name} string {text!r} gives no tokens")
            ids.append(toks[0])
        if ids[0] == ids[1]:
            raise SafeshapeError(f"preset {self.preset.name!r}: the safe string {self.preset.safe!r} and the unsafe "
                                 f"string {self.preset.unsafe!r} start with the same token ({ids[0]}); the verdict "
                                 "is read from the first token, so they must differ")
        return ids[0], ids[1]

    def _split(self, context: list[dict]) -> tuple[str, str]:
        formats = [self._content_format] if self._content_format else ["string", "parts"]
        errors = []
        for fmt in formats:
            try:
                text = _render(self.tokenizer, context, _PLACEHOLDER, self.preset, fmt)
            except Exception as exc:  # a template that rejects this content format: try the next one
                errors.append(f"{fmt}: {type(exc).__name__}: {exc}")
                continue
            if text.count(_PLACEHOLDER) == 1:
                self._content_format = fmt
                head, tail = text.split(_PLACEHOLDER)
                return head, tail
            errors.append(f"{fmt}: the assistant message appears {text.count(_PLACEHOLDER)} times in the output")
        raise SafeshapeError("the guard's chat template must put the assistant message into its output once, "
                             "verbatim; tried content formats " + "; ".join(errors))

    def build(self, context: list[dict], response: str, chunk_words: int) -> GuardInput:
        """Token ids for every prefix of ``response`` after the conversation ``context`` (messages before it)."""
        spans = chunk_char_spans(response, chunk_words)
        if not spans:
            raise SafeshapeError("the response has no words: there is nothing to score")
        head, tail = self._split(context)
        for k in sorted({1, len(spans)}):
            prefix = prefix_text(response, spans, k)
            if _render(self.tokenizer, context, prefix, self.preset, self._content_format) != head + prefix + tail:
                raise SafeshapeError(
                    "the guard's chat template does not render the assistant message as head + message + tail "
                    f"(checked on prefix {k}); STAR's prefix scoring needs the message inserted verbatim")
        stripped = head.rstrip(" ")
        lead = head[len(stripped):]
        texts = [stripped]
        for k, (start, end) in enumerate(spans):
            texts.append(lead + response[start:end] if k == 0 else response[spans[k - 1][1]:end])
        texts.append(tail + self.preset.verdict_prefix)
        full = head + prefix_text(response, spans, len(spans)) + tail + self.preset.verdict_prefix
        ids = self.tokenizer(texts + [full], add_special_tokens=False)["input_ids"]
        chunks = ids[1:-2]
        if any(len(c) == 0 for c in chunks):
            raise SafeshapeError("a chunk of the response tokenized to no tokens")
        gi = GuardInput(head=ids[0], chunks=chunks, tail=ids[-2], matches_full_text=False)
        gi.matches_full_text = gi.prefix_ids(len(chunks)) == ids[-1]
        return gi
