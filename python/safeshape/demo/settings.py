"""The demo's settings: the methods' defaults from the papers, the training profiles, a results row, and the
work folder's writers (atomic, overwriting a stage's own artifact)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import SafeshapeError
from ..io import atomic_write_text, write_json

# The methods' defaults from the papers (never tuned to this world).
SAFELORA_THRESHOLD = 0.5  # Safe LoRA, threshold mode
SAFELORA_K_PER_64 = 10  # Safe LoRA, number mode: k = 10 of Llama-2-7B's 64 q/v modules, scaled to the count
SAFELORA_ENERGY = 0.95  # the orthogonal projector keeps V's top singular directions holding this share of ||V||^2
DSS_KL_COEF = 0.5  # DSS lambda
STAR_CHUNK_WORDS = 5  # STAR M
RS_THRESHOLD = 0.5  # RS keeps a row when the guard's P(safe) on the whole response is at least this
FORMAT = 2  # of demo_settings.json and the reports


@dataclass
class Profile:
    """Sizes and steps; ``fast`` trades model quality for a run under two minutes. ``hidden`` is the default
    width of the policy and the width of the guard (the guard is the same at every policy width)."""
    name: str
    hidden: int = 64
    layers: int = 2
    base_steps: int = 2000
    align_steps: int = 1000
    guard_steps: int = 800
    batch_size: int = 32
    base_lr: float = 3e-3
    align_lr: float = 1e-3
    guard_lr: float = 3e-3
    # the fine-tuning task (the same for every method): rows, share of harmful-compliance rows, LoRA schedule
    finetune_rows: int = 400
    harmful_share: float = 0.1
    finetune_epochs: int = 10
    finetune_lr: float = 3e-3
    finetune_batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


PROFILES = {
    "full": Profile("full"),
    # fast: smaller base/aligned/guard budgets; the fine-tuning runs (a few seconds each) are the same as full
    "fast": Profile("fast", base_steps=600, align_steps=250, guard_steps=250),
}
HEADS = 4  # attention heads of every policy and guard: a width must be a multiple of this


@dataclass
class Run:
    """One row of the results table (one seed, one width)."""
    name: str
    method: str
    model: str  # the model folder scored (base or aligned)
    adapter: str | None = None  # a PEFT adapter folder applied to ``model`` before scoring
    status: str = "ok"
    safety: float | None = None
    utility: float | None = None
    modules_projected: str = ""
    details: dict = field(default_factory=dict)


def write_json_file(path: Path, obj) -> None:
    write_json(path, obj, overwrite=True)


def write_jsonl_file(path: Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows), overwrite=True)


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``: distinct non-negative integers, in the order given."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SafeshapeError(f"{what} {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise SafeshapeError(f"{what} {text!r}: expected distinct non-negative integers separated by commas")
    return values


def tiny_profile(**changes) -> Profile:
    """A profile too small to learn anything, for tests of the pipeline's mechanics (caching, seeds, widths)."""
    return replace(Profile("tiny", hidden=16, layers=1, base_steps=4, align_steps=3, guard_steps=3, batch_size=8,
                           finetune_rows=16, finetune_epochs=1), **changes)
