"""Guard presets: what a guard model emits as its verdict, and how to call its chat template."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import SafeshapeError


@dataclass(frozen=True)
class GuardPreset:
    """How to read a safe/unsafe verdict from a guard model.

    Attributes:
        safe: the verdict string meaning "safe" (its first token is the one whose logit is read).
        unsafe: the verdict string meaning "unsafe" (its first token must differ from ``safe``'s).
        verdict_prefix: the text the guard emits after its template's generation prompt and before the verdict
            (Llama Guard 3: ``"\\n\\n"``; Granite Guardian: nothing). It is appended to the guard input, so the
            verdict logits are read at the position that predicts the verdict's first token.
        template_kwargs: extra keyword arguments for ``tokenizer.apply_chat_template`` (e.g. Granite Guardian's
            ``guardian_config``); ``add_generation_prompt`` defaults to True.
        content_format: how message contents are passed to the template: ``"string"``, ``"parts"`` (a list of
            ``{"type": "text", "text": ...}``, as Llama Guard 3 1B's template expects) or ``"auto"`` (try string,
            then parts, keep the first that puts the content into the rendered text).
        name: a label for reports.
        last_user_only: show the guard only the last user message before the response (Granite Guardian: its
            template reads the last two messages, and a three-message conversation takes its tools branch).
        template_markers: text the rendered template must contain for this preset to fit it (checked once, so a
            Granite template under the Llama Guard preset, or the reverse, is refused instead of silently scored).
        refuse: a reason this preset cannot be used (a format safeshape does not read); given, every use fails.
    """

    safe: str
    unsafe: str
    verdict_prefix: str = ""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    content_format: str = "auto"
    name: str = "custom"
    last_user_only: bool = False
    template_markers: tuple[str, ...] = ()
    refuse: str = ""

    def __post_init__(self):
        if not self.safe or not self.unsafe:
            raise SafeshapeError(f"GuardPreset {self.name!r}: safe and unsafe must be non-empty strings")
        if self.safe == self.unsafe:
            raise SafeshapeError(f"GuardPreset {self.name!r}: safe and unsafe are the same string {self.safe!r}")
        if self.content_format not in ("auto", "string", "parts"):
            raise SafeshapeError(f"GuardPreset {self.name!r}: content_format must be auto, string or parts, "
                                 f"got {self.content_format!r}")

    def __hash__(self):  # template_kwargs is a dict: hash what identifies the preset
        return hash((self.safe, self.unsafe, self.verdict_prefix, self.content_format, self.name,
                     repr(sorted(self.template_kwargs.items())), self.last_user_only, self.template_markers))

    def check_rendered(self, text: str) -> None:
        """Refuse a rendered guard template that does not fit this preset (SafeshapeError saying which and why)."""
        if self.refuse:
            raise SafeshapeError(f"preset {self.name!r}: {self.refuse}")
        if "<score>" in text and self.name != "granite-guardian-3.3":
            raise SafeshapeError(f"preset {self.name!r}: the guard's template asks for a <score> yes/no </score> "
                                 "verdict (Granite Guardian 3.3), not the one this preset reads; "
                                 f"{_GRANITE_33}")
        missing = [m for m in self.template_markers if m not in text]
        if missing:
            raise SafeshapeError(f"preset {self.name!r} does not fit this guard: its rendered chat template lacks "
                                 f"{missing[0]!r} (a {self.name} template has it); choose the preset of this guard, "
                                 "or 'generic' with --safe/--unsafe")


_GRANITE_33 = ("Granite Guardian 3.3 (a <score> yes </score> verdict after an optional <think> block, risks chosen "
               "by criteria_id) is not supported by safeshape star: its verdict is not one token after the "
               "generation prompt. Use Granite Guardian 3.0-3.2 (preset granite-guardian-3), Llama Guard 3, or a "
               "generic preset if you know the verdict tokens")

PRESETS: dict[str, GuardPreset] = {
    # Llama Guard 3 (1B and 8B): the template ends at the assistant header; the guard writes "\n\nsafe" or
    # "\n\nunsafe\nS<k>". The 1B template wants list-of-parts contents, the 8B one strings: "auto" handles both.
    "llama-guard-3": GuardPreset(safe="safe", unsafe="unsafe", verdict_prefix="\n\n", name="llama-guard-3",
                                 template_markers=("'safe' or 'unsafe'",)),
    # Granite Guardian 3.0 / 3.1 / 3.2: one token, "No" (not risky) or "Yes" (risky), right after the generation
    # prompt; the risk checked is chosen by guardian_config (default: general harm). 3.1 prints today's date in its
    # system block (pinned by guard_date / --guard-date).
    "granite-guardian-3": GuardPreset(safe="No", unsafe="Yes", verdict_prefix="",
                                      template_kwargs={"guardian_config": {"risk_name": "harm"}},
                                      name="granite-guardian-3", last_user_only=True,
                                      template_markers=("'Yes' or 'No'",)),
    # Granite Guardian 3.3: refused with the reason (see _GRANITE_33)
    "granite-guardian-3.3": GuardPreset(safe="no", unsafe="yes", name="granite-guardian-3.3", refuse=_GRANITE_33),
}
PRESET_NAMES = (*PRESETS, "generic")
# what the command line offers: the presets that can score (granite-guardian-3.3 exists to explain its refusal)
USABLE_PRESET_NAMES = tuple(n for n in PRESET_NAMES if n == "generic" or not PRESETS[n].refuse)

#: scoring engines (:mod:`safeshape.star.engines`): one pass per response, or one pass per prefix; or a guard
#: served by vLLM (:mod:`safeshape.star.vllm_engine`, optional)
ENGINES = ("shared", "naive", "vllm")
RECIPES = ("exact", "authors")  # docs/math.md#star-exact-guard-input or docs/math.md#star-authors-recipe


def get_preset(name: str | GuardPreset, safe: str | None = None, unsafe: str | None = None,
               verdict_prefix: str | None = None) -> GuardPreset:
    """A preset by name (``llama-guard-3``, ``granite-guardian-3``, ``generic``), with optional overrides.

    ``generic`` needs ``safe`` and ``unsafe`` (and takes ``verdict_prefix``, default empty); a named preset may have
    any of the three overridden.
    """
    if isinstance(name, GuardPreset):
        base = name
    elif name == "generic":
        if safe is None or unsafe is None:
            raise SafeshapeError("preset 'generic': give the verdict strings with safe=... and unsafe=... "
                                 "(--safe/--unsafe), and verdict_prefix=... if the guard writes text before them")
        return GuardPreset(safe=safe, unsafe=unsafe, verdict_prefix=verdict_prefix or "", name="generic")
    elif name in PRESETS:
        base = PRESETS[name]
    else:
        raise SafeshapeError(f"unknown guard preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    changes = {k: v for k, v in (("safe", safe), ("unsafe", unsafe), ("verdict_prefix", verdict_prefix))
               if v is not None}
    return dataclasses.replace(base, **changes) if changes else base
