"""Which models ``safeshape eval`` compares: ``--model [NAME=]DIR`` (repeatable), ``--adapter [NAME=]DIR`` on one
of them, and the Safe LoRA projections that ``--project-base`` asks for, as one ordered plan.

Order: each model, followed by its adapters, each adapter followed by its projection. A lone unnamed ``--model``
is named ``base`` (what one model has always been called); several unnamed ones are named after their folders.
Adapters go on the model named by ``--adapter-model`` (default: the last ``--model``, in the usual
``--model base=B --model aligned=A`` the aligned one, which Safe LoRA assumes they were trained from).

A projection is made for an adapter unless it is one already (its folder holds ``safelora_report.json``, written
by ``safeshape project``) or the user gave its projection under the name ``NAME+safelora`` (the README's naming):
an adapter is never projected twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SafeshapeError

SAFELORA_SUFFIX = "+safelora"
SAFELORA_REPORT = "safelora_report.json"


@dataclass(frozen=True)
class EvalModel:
    name: str
    model: str                      # the model folder (the adapter's base when adapter is given)
    adapter: str | None = None      # a PEFT adapter folder on ``model``
    projects: str | None = None     # set for a projection eval makes: the adapter folder it projects


def parse_named(spec: str, flag: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; ``PATH`` -> ``(None, PATH)``. A ``=`` inside a path that exists is a path."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        return None, spec
    if not name or not path:
        raise SafeshapeError(f"{flag} {spec!r}: expected PATH or NAME=PATH")
    return name, path


def folder_name(path: str) -> str:
    return Path(path.rstrip("/")).name or path


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    """``--model`` values -> ``[(name, dir)]``; a lone unnamed one is ``base``."""
    if not specs:
        raise SafeshapeError("--model: give at least one model")
    parsed = [parse_named(s, "--model") for s in specs]
    if len(parsed) == 1 and parsed[0][0] is None:
        return [("base", parsed[0][1])]
    return [(n or folder_name(p), p) for n, p in parsed]


def is_projection(adapter: str) -> bool:
    """An adapter that ``safeshape project`` wrote (its report sits next to its weights)."""
    return (Path(adapter) / SAFELORA_REPORT).is_file()


def plan(models: list[tuple[str, str]], adapters: list[tuple[str, str]], adapter_model: str | None = None,
         project: bool = False, projected_dir: str | Path = "projected") -> list[EvalModel]:
    """The ordered list of what is evaluated; names must differ. ``projected_dir``: where eval writes projections
    (``<projected_dir>/<adapter name>``)."""
    names = [n for n, _ in models]
    if adapter_model is None:
        on = models[-1][1]
        adapter_model = models[-1][0]
    elif adapter_model not in names:
        raise SafeshapeError(f"--adapter-model {adapter_model!r}: not the name of a --model (names: "
                             f"{', '.join(names)})")
    else:
        on = dict(models)[adapter_model]
    if project and not adapters:
        raise SafeshapeError("--project-base projects the --adapter folders: give at least one --adapter")
    given = {n for n, _ in adapters}
    out: list[EvalModel] = []
    for name, folder in models:
        out.append(EvalModel(name, folder))
        if name != adapter_model:
            continue
        for an, ap in adapters:
            out.append(EvalModel(an, on, ap))
            if project and not is_projection(ap) and an + SAFELORA_SUFFIX not in given:
                out.append(EvalModel(an + SAFELORA_SUFFIX, on, str(Path(projected_dir) / an), projects=ap))
    seen: dict[str, int] = {}
    for m in out:
        seen[m.name] = seen.get(m.name, 0) + 1
    clash = sorted(n for n, c in seen.items() if c > 1)
    if clash:
        raise SafeshapeError(f"model names must differ (--model NAME=DIR, --adapter NAME=DIR), {', '.join(clash)} "
                             f"is used twice; names: {', '.join(m.name for m in out)}")
    return out
