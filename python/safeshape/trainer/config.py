"""TrainConfig: every field is a ``safeshape train`` flag (``lora_r`` is ``--lora-r``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..data import LOSSES
from ..errors import SafeshapeError


@dataclass
class TrainConfig:
    """LoRA fine-tuning with the SFT, RS or DSS loss (SPEC.md section 3)."""

    model: str  # local HF causal-LM folder (the aligned chat model) with its tokenizer and chat template
    data: str  # JSONL rows: {prompt, response} or {messages}; + `safe` for rs; + STAR fields for dss
    out: str  # output folder: final adapter (PEFT layout), metrics.jsonl, checkpoint-<step>/
    loss: str = "dss"  # dss | sft (w = 1, no KL) | rs (per-row w = safe in {0, 1}, no KL)
    kl_coef: float = 0.5  # lambda of the DSS KL term (dss only)
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # Linear leaf names, as PEFT matches a list
    epochs: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"  # linear (warmup then linear decay to 0) | constant (after warmup)
    max_grad_norm: float = 1.0  # 0 disables clipping
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    max_len: int = 512  # tokens per row (longer rows are cut at the end)
    seed: int = 0
    bf16: bool = False  # load the base weights in bfloat16 (LoRA weights stay float32)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    resume: bool = False  # continue from the newest checkpoint in `out` (starts fresh if there is none)
    overwrite: bool = False  # replace an existing `out`
    max_steps: int | None = None  # optimizer steps to run, instead of --epochs (sets the schedule length)
    device: str = "cpu"  # cpu | cuda (under torchrun each process takes cuda:LOCAL_RANK)
    progress: bool = True  # progress bar on rank 0
    fused: bool = True  # fused lm-head loss ops (False: logits are formed, for comparison)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(m.strip() for m in self.target_modules.split(",") if m.strip())
        self.target_modules = tuple(self.target_modules)
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> SafeshapeError:
            return SafeshapeError(f"--{name.replace('_', '-')}: {why}")

        if self.loss not in LOSSES:
            raise bad("loss", f"must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.schedule not in ("linear", "constant"):
            raise bad("schedule", f"must be linear or constant, not {self.schedule!r}")
        for name in ("lora_r", "epochs", "batch_size", "grad_accum", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, f"must be a positive integer, not {getattr(self, name)!r}")
        for name in ("save_every", "warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, f"must be a non-negative integer, not {getattr(self, name)!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", f"must be a positive integer, not {self.max_steps!r}")
        for name in ("kl_coef", "weight_decay", "max_grad_norm", "lora_dropout", "lr", "lora_alpha"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise bad(name, f"must be a finite number, not {getattr(self, name)}")
        for name in ("kl_coef", "weight_decay", "max_grad_norm", "lora_dropout"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, not {getattr(self, name)}")
        if not self.lora_dropout < 1:
            raise bad("lora_dropout", f"must be < 1, not {self.lora_dropout}")
        if not self.lr > 0:
            raise bad("lr", f"must be > 0, not {self.lr}")
        if not self.target_modules:
            raise bad("target_modules", "names no module")
        if self.resume and self.overwrite:
            raise SafeshapeError("--resume and --overwrite exclude each other")


# fields that may change between a run and its --resume without changing what is computed
RESUMABLE_CHANGES = {"out", "save_every", "resume", "overwrite", "progress", "device"}
