"""``safeshape train``: LoRA fine-tuning with the SFT, RS, DSS or Deep Token loss. One flag per TrainConfig field.

Prints a human summary, and the same summary as one JSON line on stdout with ``--json``.
Multi-process: ``torchrun --nproc_per_node=N -m safeshape train ...`` (or ``accelerate launch --multi_gpu``, or an MPI
launcher; see :mod:`safeshape.trainer.distributed`).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from ..data import TRAIN_ON
from ..errors import SafeshapeError
from ..io import json_main, print_json
from .config import DTYPES, LOSSES, MIXED_PRECISION, TrainConfig

_CHOICES = {"loss": LOSSES, "schedule": ("linear", "constant"), "mixed_precision": MIXED_PRECISION,
            "report_to": ("none", "tensorboard", "wandb"), "train_on": TRAIN_ON,
            "dtype": DTYPES}

_HELP = {
    "model": "Hugging Face causal LM (the aligned chat model, with its tokenizer and chat template): a folder, or a "
             "hub id read through the HF cache (HF_HUB_OFFLINE=1: the cache only)",
    "data": "rows {prompt, response} or {messages}; rs rows add `safe`; dss rows add `star_values` and "
            "`star_chunk_words` (from `safeshape star`): a .jsonl, .json, .parquet or .csv file, or a "
            "datasets.save_to_disk folder (parquet, CSV and folders need the datasets package)",
    "split": "split of a save_to_disk folder given as --data (default: its only split)",
    "train_on": "last: loss on the last assistant turn of a messages row; all: on every assistant turn (sft, rs)",
    "eval_split": "split of a save_to_disk folder given as --eval-data",
    "out": "output folder: final adapter (PEFT layout), metrics.jsonl, checkpoint-<step>/",
    "loss": "dss (STAR-weighted CE + KL to the adapter-disabled model), sft, rs (sft on the rows with safe=true), "
            "or deep-token (Qi et al.'s token-wise constrained objective against the adapter-disabled model)",
    "kl_coef": "lambda of the DSS KL term",
    "dss_kl_clamp": "dss: bound the k2 term 0.5 (l - l_ref)^2 by this value, as OpenRLHF clamps its KL estimate "
                    "since July 2025 (10 there; no gradient from that term beyond it); default: unbounded, as the "
                    "DSS authors' loss",
    "deep_token_betas": "deep-token: comma-separated beta of response positions 1, 2, ...; the last holds for every "
                        "later position",
    "rs_keep_rejected": "rs: keep rejected rows with weight 0 and count their tokens in N, as the authors' released "
                        "code does, instead of dropping them as the paper describes (the default)",
    "lora_r": "LoRA rank r",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "target_modules": "comma-separated Linear names to adapt, or all-linear (every Linear but the output head, "
                      "as PEFT)",
    "epochs": "passes over the data (unless --max-steps)",
    "lr": "AdamW learning rate (peak, after warmup)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "optimizer steps of linear warmup from 0",
    "seed": "seed of the LoRA init, data order and dropout",
    "batch_size": "rows per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step",
    "max_len": "tokens per row (longer rows are cut at the end)",
    "dtype": "dtype of the base weights: auto (the checkpoint's torch_dtype), bfloat16, float16 or float32 (LoRA "
             "weights stay float32)",
    "bf16": "the old spelling of --dtype bfloat16",
    "load_in_4bit": "QLoRA: load the base's Linear layers in 4-bit NF4 through bitsandbytes (computing in --dtype; "
                    "the output head stays unquantized)",
    "load_in_8bit": "load the base's Linear layers in 8-bit (bitsandbytes LLM.int8)",
    "fsdp": "shard the model over the processes with FSDP2 (each decoder layer and the root a unit; gloo on CPU, "
            "nccl on CUDA); accelerate launch with an FSDP config turns it on",
    "compile": "torch.compile each decoder layer",
    "mixed_precision": "bf16: run the forward passes under bfloat16 autocast, whatever dtype the weights have",
    "gradient_checkpointing": "recompute the decoder layers' activations in backward: less memory, more compute",
    "save_every": "checkpoint every N optimizer steps (0: only at the end)",
    "resume": "continue from the newest checkpoint in --out (starts fresh when there is none)",
    "overwrite": "replace an existing --out",
    "max_steps": "optimizer steps to run, instead of --epochs (sets the schedule length)",
    "device": "auto (cuda when available, else cpu), cpu, cuda or cuda:N (several processes: cuda:LOCAL_RANK)",
    "progress": "progress bar on a terminal (--no-progress to hide; off anyway when stderr is not a terminal)",
    "fused": "fused lm-head loss (--no-fused forms the logits, for comparison)",
    "schedule": "linear (decay to 0 after warmup) or constant",
    "eval_data": "held-out rows in the --data layout: their loss (the training objective, no dropout) is logged as "
                 "eval_loss in metrics.jsonl and the summary",
    "eval_every": "evaluate every N optimizer steps (0: after the last step only)",
    "report_to": "also send the metrics to tensorboard (OUT/runs) or wandb (WANDB_PROJECT, WANDB_MODE), rank 0",
    "max_grad_norm": "gradient clipping norm (0: off)",
}


def _kind(f):
    """The Python type a flag's text converts to: int, float or str."""
    return {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # defaults are SUPPRESSed: a flag that was not given is absent from the namespace, so a --config file can
    # supply it and TrainConfig's own defaults apply after that
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, "")
        if f.default is MISSING:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text + " (required, here or in --config)")
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{help_text} (default {'on' if f.default else 'off'})")
        elif isinstance(f.default, tuple):  # comma-separated on the command line
            parser.add_argument(flag, default=argparse.SUPPRESS,
                                help=f"{help_text} (default {','.join(str(x) for x in f.default)})")
        else:
            parser.add_argument(flag, type=_kind(f), default=argparse.SUPPRESS, choices=_CHOICES.get(f.name),
                                help=help_text if f.default is None else f"{help_text} (default {f.default})")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON or YAML file of settings with the same names as these flags (lora_r or lora-r); "
                             "flags given on the command line win")
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line")


def load_config_file(path: str) -> dict:
    """The settings of a ``--config`` file: a JSON or YAML mapping whose keys are TrainConfig fields (``-`` or
    ``_``); numbers written as text (YAML's ``2e-4``) are converted. Errors name the file and key."""
    known = {f.name: f for f in fields(TrainConfig)}
    if not path.endswith((".json", ".yaml", ".yml")):
        raise SafeshapeError(f"--config {path}: name a .json, .yaml or .yml file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise SafeshapeError(f"--config {path}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (ValueError, ImportError) as exc:  # json.JSONDecodeError is a ValueError
        raise SafeshapeError(f"--config {path}: cannot read it: {exc}") from None
    except Exception as exc:  # yaml.YAMLError, without importing yaml for JSON files
        raise SafeshapeError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise SafeshapeError(f"--config {path}: must hold a mapping of settings, not {type(values).__name__}")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise SafeshapeError(f"--config {path}: unknown key {key!r} (the keys are the train flags: "
                                 f"{', '.join(sorted(known))})")
        kind = _kind(known[name])
        if isinstance(value, str) and kind in (int, float):
            try:
                value = kind(value)
            except ValueError:
                what = "an int" if kind is int else "a number"
                raise SafeshapeError(f"--config {path}: {key}: {value!r} is not {what}") from None
        if isinstance(value, list) and isinstance(known[name].default, tuple):  # target_modules, deep_token_betas
            value = ",".join(map(str, value))
        out[name] = value
    return out


@json_main
def main(args: argparse.Namespace) -> int:
    from .loop import train

    try:
        settings = load_config_file(args.config) if args.config else {}
        settings.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
        missing = [f"--{f.name.replace('_', '-')}" for f in fields(TrainConfig)
                   if f.default is MISSING and f.name not in settings]
        if missing:
            raise SafeshapeError(f"{', '.join(missing)} required (on the command line or in --config)")
        settings["progress"] = settings.get("progress", True) and sys.stderr.isatty()  # no bars in logs
        config = TrainConfig(**settings)
        summary = train(config)
    except SafeshapeError as exc:
        print(f"safeshape train: error: {exc}", file=sys.stderr)
        return 2
    if summary["rank"]:
        return 0
    resumed = f" (resumed at step {summary['resumed_from']})" if summary["resumed_from"] is not None else ""
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    if summary.get("eval_loss") is not None:
        loss += f", eval loss {summary['eval_loss']:.4f}"
    print(f"trained {summary['steps']} steps{resumed}, world size {summary['world_size']} (global batch "
          f"{summary['global_batch']}), final loss {loss}, adapter in {summary['out']}",
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print_json({k: v for k, v in summary.items() if k != "config"})
    return 0
