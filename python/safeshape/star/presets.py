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
    """

    safe: str
    unsafe: str
    verdict_prefix: str = ""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    content_format: str = "auto"
    name: str = "custom"

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
                     repr(sorted(self.template_kwargs.items()))))


PRESETS: dict[str, GuardPreset] = {
    # Llama Guard 3 (1B and 8B): the template ends at the assistant header; the guard writes "\n\nsafe" or
    # "\n\nunsafe\nS<k>". The 1B template wants list-of-parts contents, the 8B one strings: "auto" handles both.
    "llama-guard-3": GuardPreset(safe="safe", unsafe="unsafe", verdict_prefix="\n\n", name="llama-guard-3"),
    # Granite Guardian 3.1 / 3.2: one token, "No" (not risky) or "Yes" (risky), right after the generation prompt;
    # the risk checked is chosen by guardian_config (default: general harm).
    "granite-guardian-3": GuardPreset(safe="No", unsafe="Yes", verdict_prefix="",
                                      template_kwargs={"guardian_config": {"risk_name": "harm"}},
                                      name="granite-guardian-3"),
}
PRESET_NAMES = (*PRESETS, "generic")

#: scoring engines (:mod:`safeshape.star.engines`): one pass per response, or one pass per prefix
ENGINES = ("shared", "naive")


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
