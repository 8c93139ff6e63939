"""TrainConfig: every field is a ``safeshape train`` flag (``lora_r`` is ``--lora-r``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..data import LOSSES as DATA_LOSSES, TRAIN_ON
from ..errors import SafeshapeError
from ..schedules import DEEP_TOKEN_BETAS


# the losses of `safeshape train`: deep-token reads its rows as sft does (no extra fields)
LOSSES = (*DATA_LOSSES, "deep-token")


@dataclass
class TrainConfig:
    """LoRA fine-tuning with the SFT, RS, DSS or Deep Token loss (docs/math.md#dss-loss,
    docs/math.md#sft-and-rejection-sampling, docs/math.md#deep-token)."""

    model: str  # HF causal-LM folder or hub id (the aligned chat model) with its tokenizer and chat template
    data: str  # rows {prompt, response} or {messages} (+ `safe` for rs, STAR fields for dss): a file or a dataset folder
    out: str  # output folder: final adapter (PEFT layout), metrics.jsonl, checkpoint-<step>/
    loss: str = "dss"  # dss | sft (w = 1, no KL) | rs (sft on the rows with safe = true) | deep-token
    split: str | None = None  # the split of a datasets.save_to_disk folder given as `data`
    train_on: str = "last"  # last | all: which assistant turns of a `messages` row carry loss (all: sft and rs)
    kl_coef: float = 0.5  # lambda of the DSS KL term (dss only)
    dss_kl_clamp: float | None = None  # bound of the DSS k2 term as OpenRLHF's clamp (None: unbounded, the authors')
    deep_token_betas: tuple[float, ...] = DEEP_TOKEN_BETAS  # beta of response positions 1, 2, ...; the last holds on
    rs_keep_rejected: bool = False  # rs: keep rejected rows with weight 0 (N counts them) instead of dropping them
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # Linear leaf names, as PEFT matches a list; or all-linear
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
    dtype: str = "auto"  # auto (the checkpoint's torch_dtype) | bfloat16 | float16 | float32: the base weights
    bf16: bool = False  # the old spelling of --dtype bfloat16 (kept working)
    load_in_4bit: bool = False  # QLoRA: the base's Linear layers in 4-bit NF4 (bitsandbytes); LoRA stays float32
    load_in_8bit: bool = False  # the base's Linear layers in 8-bit (bitsandbytes LLM.int8)
    fsdp: bool = False  # FSDP2: shard the model over the processes (each decoder layer and the root a unit)
    compile: bool = False  # torch.compile each decoder layer
    mixed_precision: str = "no"  # no | bf16: forward passes under bfloat16 autocast (weights keep their dtype)
    gradient_checkpointing: bool = False  # recompute the decoder layers' activations in backward (less memory)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    resume: bool = False  # continue from the newest checkpoint in `out` (starts fresh if there is none)
    overwrite: bool = False  # replace an existing `out`
    max_steps: int | None = None  # optimizer steps to run, instead of --epochs (sets the schedule length)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda[:N] (under torchrun: cuda:LOCAL_RANK)
    progress: bool = True  # progress bar on rank 0
    fused: bool = True  # fused lm-head loss ops (False: logits are formed, for comparison)
    eval_data: str | None = None  # held-out rows (same layout as `data`): the loss over them is logged as eval_loss
    eval_split: str | None = None  # the split of a save_to_disk folder given as `eval_data`
    eval_every: int = 0  # evaluate every N optimizer steps (0: after the last step only)
    report_to: str = "none"  # none | tensorboard (OUT/runs) | wandb: a copy of metrics.jsonl for dashboards

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(m.strip() for m in self.target_modules.split(",") if m.strip())
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.deep_token_betas, str):
            try:
                self.deep_token_betas = tuple(float(b) for b in self.deep_token_betas.split(",") if b.strip())
            except ValueError:
                raise SafeshapeError(f"--deep-token-betas: must be comma-separated numbers, not "
                                     f"{self.deep_token_betas!r}") from None
        self.deep_token_betas = tuple(float(b) for b in self.deep_token_betas)
        self.validate()

    @property
    def base_dtype(self) -> str:
        """The dtype the base weights load in: ``auto`` (the checkpoint's ``torch_dtype``) or a torch dtype name."""
        return "bfloat16" if self.bf16 else self.dtype

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
        for name in ("save_every", "warmup_steps", "eval_every"):
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
        if self.dss_kl_clamp is not None:
            if not (math.isfinite(self.dss_kl_clamp) and self.dss_kl_clamp > 0):
                raise bad("dss_kl_clamp", f"must be a finite number > 0, not {self.dss_kl_clamp}")
            if self.loss != "dss":
                raise bad("dss_kl_clamp", f"applies to --loss dss (its KL term), not {self.loss}")
        if not self.lora_dropout < 1:
            raise bad("lora_dropout", f"must be < 1, not {self.lora_dropout}")
        if not self.lr > 0:
            raise bad("lr", f"must be > 0, not {self.lr}")
        if not self.deep_token_betas or not all(b > 0 for b in self.deep_token_betas):
            raise bad("deep_token_betas", f"must be positive numbers, not {self.deep_token_betas}")
        if not self.target_modules:
            raise bad("target_modules", "names no module")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise bad("target_modules", "all-linear stands alone (it already names every Linear but the output head)")
        if self.train_on not in TRAIN_ON:
            raise bad("train_on", f"must be one of {', '.join(TRAIN_ON)}, not {self.train_on!r}")
        if self.train_on == "all" and self.loss in ("dss", "deep-token"):
            raise bad("train_on", "all: STAR values and Deep Token's positions cover the last response only; use "
                                  "--loss sft or rs")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise bad("report_to", f"must be none, tensorboard or wandb, not {self.report_to!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", f"must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.bf16 and self.dtype not in ("auto", "bfloat16"):
            raise bad("bf16", f"is the old spelling of --dtype bfloat16 and contradicts --dtype {self.dtype}; "
                              "give --dtype only")
        if self.load_in_4bit and self.load_in_8bit:
            raise SafeshapeError("--load-in-4bit and --load-in-8bit exclude each other")
        if self.fsdp and (self.load_in_4bit or self.load_in_8bit):
            raise bad("fsdp", f"with --load-in-{4 if self.load_in_4bit else 8}bit is not supported (bitsandbytes' "
                              "quantized weights are not sharded here); a 4-bit base is a quarter of its bf16 size, "
                              "so train it with one full copy per process (DDP, no --fsdp)")
        if self.resume and self.overwrite:
            raise SafeshapeError("--resume and --overwrite exclude each other")


MIXED_PRECISION = ("no", "bf16")
DTYPES = ("auto", "bfloat16", "float16", "float32")

# fields that may change between a run and its --resume without changing what is computed
RESUMABLE_CHANGES = {"out", "save_every", "resume", "overwrite", "progress", "device", "gradient_checkpointing",
                     "eval_data", "eval_split", "eval_every", "report_to",
                     # the same computation, sharded or compiled (checkpoints hold full, unsharded states)
                     "fsdp", "compile",
                     # the run's length: --resume with a larger --max-steps/--epochs extends it (the steps done are
                     # the same; the LR schedule is the new length's from the checkpoint's step on)
                     "max_steps", "epochs"}
