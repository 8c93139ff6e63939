"""``safeshape eval``'s checks of every input it will need, run before anything is generated (a mistake found
after hours of generation costs those hours): each model folder and its tokenizer's chat template, each adapter
against the model it goes on (shapes, on a meta-device copy of the model built from its config: no weights are
read), the guard's tokenizer and template against the preset. Returns warnings (an adapter whose recorded base is
another model); raises :class:`SafeshapeError` naming the argument and file at fault."""
from __future__ import annotations

from ..errors import SafeshapeError
from ..models import meta_model
from .models import EvalModel


def check_model_folder(folder: str, flag: str = "--model"):
    """A Hugging Face causal LM folder whose tokenizer can prompt it (chat template, EOS); returns the tokenizer."""
    from ..models import load_tokenizer
    from .generate import check_policy_tokenizer

    return load_tokenizer(folder, flag, check=check_policy_tokenizer, model_folder=True)


def check_guard(folder: str, preset) -> None:
    """The guard's tokenizer, chat template and verdict tokens against ``preset`` (a template of another guard
    family, a verdict string that gives no token): what scoring would find after every response was generated."""
    from ..star.guard import load_guard_tokenizer
    from ..star.template import GuardTemplate

    tokenizer = load_guard_tokenizer(folder, "--guard")
    try:
        GuardTemplate(tokenizer, preset).split_template([{"role": "user", "content": "Is this safe?"}])
    except SafeshapeError as exc:
        raise SafeshapeError(f"--guard {folder} with --preset {preset.name}: {exc}") from None


def check_models(models: list[EvalModel], given: dict[str, str] | None = None) -> list[str]:
    """Every model folder and every adapter on it (see the module doc); ``given``: folder -> what the user typed
    (a hub id), for messages and the recorded-base comparison. Returns warnings."""
    from ..safelora.adapter import base_mismatch
    from .adapters import check_adapter

    given = given or {}
    warnings: list[str] = []
    metas = {}
    for m in models:
        if m.adapter is None:
            check_model_folder(m.model)
            continue
        if m.projects is not None:  # made later by eval from an adapter checked here
            continue
        if m.model not in metas:
            check_model_folder(m.model)
            metas[m.model] = meta_model(m.model)
        check_adapter(metas[m.model], m.adapter)
        w = base_mismatch(m.adapter, m.model, given.get(m.model), role="the model")
        if w:
            warnings.append(f"--adapter {m.name}: {w}")
    return warnings

