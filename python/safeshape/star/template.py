"""Guard inputs as token ids: exactly the ids Hugging Face would feed the guard for every prefix (docs/math.md#star-exact-guard-input).

The guard input for prefix k is ``tokenizer(render(context + [assistant: prefix k]), add_special_tokens=False)``
followed by the ids of the preset's verdict prefix, where ``render`` is the guard's own chat template through
``apply_chat_template(..., add_generation_prompt=True, tokenize=False)``. The template is rendered once with a
placeholder for the assistant message, which splits it into a head (policy text + conversation so far) and a tail
(the text after the assistant message); the renderings of the shortest and the full prefix are checked against
head + prefix + tail.

Token boundaries (the subtlety): byte-level BPE merges across the end of a prefix (Llama 3: ``.\\n\\n``, ``:\\n\\n``
and ``?\\n\\n`` are single tokens), so prefix k's ids are not "the response's tokens up to chunk k, then the
tail's". Each prefix's rendered text is therefore tokenized in full (the tokenizer is fast next to any guard
pass), and compared with ``body`` = the tokens of head + the whole response: prefix k shares the first
``shared[k]`` body tokens and adds its own ``tails[k]`` (the re-tokenized boundary tokens, the template tail and
the verdict prefix). The shared engine computes the body once and each tail against its shared part; the naive
engine feeds ``prefix_ids(k)``. Both see exactly the Hugging Face ids by construction.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
from dataclasses import dataclass
from typing import Any

from ..chunks import chunk_char_spans, prefix_text
from ..errors import SafeshapeError
from .presets import GuardPreset

_PLACEHOLDER = "\ue000STAR-RESPONSE\ue001"


@dataclass
class GuardInput:
    """Token ids of the guard inputs of every prefix of one response: prefix k (1-based) is
    ``body[:shared[k-1]] + tails[k-1]``."""

    body: list[int]  # head + the whole response, tokenized as one text
    shared: list[int]  # per prefix: how many leading body tokens its ids share with the body
    tails: list[list[int]]  # per prefix: its ids after the shared part (boundary tokens, template tail, verdict prefix)
    had_system: bool = False  # the conversation had a system message (not shown to the guard)

    @property
    def num_prefixes(self) -> int:
        return len(self.tails)

    def prefix_ids(self, k: int) -> list[int]:
        return self.body[:self.shared[k - 1]] + self.tails[k - 1]

    @property
    def shared_tokens(self) -> int:
        """Guard tokens of the shared layout: the body once, plus every tail."""
        return len(self.body) + sum(len(t) for t in self.tails)

    @property
    def naive_tokens(self) -> int:
        return sum(s + len(t) for s, t in zip(self.shared, self.tails))


def _as_content(text: str, content_format: str) -> Any:
    return [{"type": "text", "text": text}] if content_format == "parts" else text


class _PinnedDate:
    """Stands in for ``datetime.datetime`` in transformers' chat-template helpers: ``now()`` is the pinned day."""

    def __init__(self, day: _dt.date):
        self._now = _dt.datetime(day.year, day.month, day.day, 12, 0, 0)

    def now(self, tz=None):
        return self._now

    def __getattr__(self, name):
        return getattr(_dt.datetime, name)


@contextlib.contextmanager
def _pinned_today(day: _dt.date | None):
    """Templates that print today's date (Granite Guardian 3.1 through ``strftime_now``) see ``day`` instead."""
    if day is None:
        yield
        return
    from transformers.utils import chat_template_utils as ctu

    original = getattr(ctu, "datetime", None)
    ctu.datetime = _PinnedDate(day)
    try:
        yield
    finally:
        ctu.datetime = original


def render(tokenizer, context: list[dict], assistant_text: str, preset: GuardPreset, content_format: str = "string",
           guard_date: _dt.date | None = None) -> str:
    """The guard's chat template on ``context + [assistant: assistant_text]`` with the generation prompt, as text
    (what Hugging Face renders; ``guard_date`` pins the date a template prints)."""
    messages = [{**m, "content": _as_content(m["content"], content_format)} for m in context]
    messages.append({"role": "assistant", "content": _as_content(assistant_text, content_format)})
    kwargs = {"add_generation_prompt": True, **preset.template_kwargs}
    with _pinned_today(guard_date):
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def guard_context(context: list[dict], preset: GuardPreset) -> tuple[list[dict], bool]:
    """The messages the guard is shown before the response, and whether a system message was dropped.

    System messages are not shown to the guard (as the STAR authors do). A preset with ``last_user_only`` (Granite
    Guardian, whose template reads only the last two messages, and takes a tools/function-call branch for exactly
    three) keeps only the last user message.
    """
    had_system = any(m.get("role") == "system" for m in context)
    kept = [{"role": m["role"], "content": m["content"]} for m in context if m.get("role") != "system"]
    if preset.last_user_only:
        users = [m for m in kept if m["role"] == "user"]
        if not users:
            raise SafeshapeError(f"preset {preset.name!r}: the conversation has no user message before the response")
        kept = [users[-1]]
    if not kept:
        raise SafeshapeError("the conversation has no message before the response other than system messages")
    return kept, had_system


class GuardTemplate:
    """A guard tokenizer + preset: builds :class:`GuardInput` for (conversation, response) pairs."""

    def __init__(self, tokenizer, preset: GuardPreset, guard_date: _dt.date | None = None):
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            raise SafeshapeError(f"the guard tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                                 "template: STAR needs the guard's own chat template")
        self.tokenizer = tokenizer
        self.preset = preset
        if preset.refuse:
            raise SafeshapeError(f"preset {preset.name!r}: {preset.refuse}")
        self.uses_date = "strftime_now" in str(template)
        self.guard_date = (guard_date or _dt.date.today()) if self.uses_date else guard_date
        self._content_format = None if preset.content_format == "auto" else preset.content_format
        self.safe_id, self.unsafe_id = self._verdict_ids()
        self.verdict_prefix_ids = (tokenizer(preset.verdict_prefix, add_special_tokens=False)["input_ids"]
                                   if preset.verdict_prefix else [])
        if self.uses_date:
            self._check_date_pinning()

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

    def _check_date_pinning(self) -> None:
        """A template that prints today's date must see the pinned one, or scores are not reproducible."""
        ctx = [{"role": "user", "content": "hello"}]
        errors = []
        for fmt in [self._content_format] if self._content_format else ["string", "parts"]:
            try:
                a = render(self.tokenizer, ctx, "x", self.preset, fmt, _dt.date(2001, 2, 3))
                b = render(self.tokenizer, ctx, "x", self.preset, fmt, _dt.date(2002, 3, 4))
                break
            except Exception as exc:  # the template rejects this content format: try the next one
                errors.append(exc)
        else:  # never skipped silently: an unpinned date would make scores depend on the day they were made
            raise SafeshapeError("the guard's chat template prints today's date, and rendering it to check that the "
                                 f"date can be pinned failed: {type(errors[-1]).__name__}: {errors[-1]}") from errors[-1]
        if a == b and "2001" not in a:
            return  # the date is not printed on this path
        if "2001" not in a or "2002" not in b:
            raise SafeshapeError("the guard's chat template prints today's date, and safeshape could not pin it "
                                 "(the transformers chat-template helpers changed?): scores would not be reproducible")

    def render(self, context: list[dict], assistant_text: str) -> str:
        """The rendered guard text for ``context`` (already filtered by :func:`guard_context`) + the assistant text."""
        return render(self.tokenizer, context, assistant_text, self.preset, self._content_format or "string",
                      self.guard_date)

    def split_template(self, context: list[dict]) -> tuple[str, str]:
        """(head, tail): the rendered template before and after the assistant message, for ``context``; finds the
        content format, and refuses a template that drops a message or does not fit the preset."""
        formats = [self._content_format] if self._content_format else ["string", "parts"]
        errors = []
        for fmt in formats:
            try:
                text = render(self.tokenizer, context, _PLACEHOLDER, self.preset, fmt, self.guard_date)
            except Exception as exc:  # a template that rejects this content format: try the next one
                errors.append(f"{fmt} contents: {type(exc).__name__}: {exc}")
                continue
            if text.count(_PLACEHOLDER) != 1:
                errors.append(f"{fmt} contents: the assistant message appears {text.count(_PLACEHOLDER)} times in "
                              "the output")
                continue
            head, tail = text.split(_PLACEHOLDER)
            missing = [i for i, m in enumerate(context) if m["content"].strip() and m["content"].strip() not in head]
            if missing:  # e.g. Llama Guard 3 1B's template given string contents renders an empty user turn
                errors.append(f"{fmt} contents: the template dropped the content of message(s) {missing} (rendered "
                              "an empty turn)")
                continue
            self.preset.check_rendered(head + tail)
            self._content_format = fmt
            return head, tail
        raise SafeshapeError("the guard's chat template must put every message of the conversation into its "
                             "output, and the assistant message once, verbatim; tried " + "; ".join(errors))

    def build(self, context: list[dict], response: str, chunk_words: int, normalize_whitespace: bool = False
              ) -> GuardInput:
        """Token ids for every prefix of ``response`` after the conversation ``context`` (messages before it).

        Prefix k is the response from its first word to the end of chunk k; with ``normalize_whitespace`` (the STAR
        authors' recipe, docs/math.md#star-authors-recipe) it is ``" ".join(response.split()[:k * chunk_words])``.
        """
        spans = chunk_char_spans(response, chunk_words)
        if not spans:
            raise SafeshapeError("the response has no words: there is nothing to score")
        context, had_system = guard_context(context, self.preset)
        head, tail = self.split_template(context)
        if normalize_whitespace:
            words = response.split()
            prefixes = [" ".join(words[:k * chunk_words]) for k in range(1, len(spans) + 1)]
        else:
            prefixes = [prefix_text(response, spans, k) for k in range(1, len(spans) + 1)]
        for k in sorted({1, len(spans)}):
            if self.render(context, prefixes[k - 1]) != head + prefixes[k - 1] + tail:
                raise SafeshapeError(
                    "the guard's chat template does not render the assistant message as head + message + tail "
                    f"(checked on prefix {k}); STAR's prefix scoring needs the message inserted verbatim")
        texts = [head + prefixes[-1]] + [head + p + tail for p in prefixes]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        body = ids[0]
        shared, tails = [], []
        for full in ids[1:]:
            full = full + self.verdict_prefix_ids
            n = _common_prefix(body, full, limit=len(full) - 1)  # at least the last token is the tail's (read there)
            shared.append(n)
            tails.append(full[n:])
        return GuardInput(body=body, shared=shared, tails=tails, had_system=had_system)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most ``limit`` (a binary search on C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
