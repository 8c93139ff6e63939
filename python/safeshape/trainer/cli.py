"""``safeshape train``: LoRA fine-tuning with the SFT, RS, DSS or Deep Token loss. One flag per TrainConfig field.

Prints a human summary, and the same summary as one JSON line on stdout with ``--json``.
Multi-process: ``torchrun --nproc_per_node=N -m safeshape train ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from ..errors import SafeshapeError
from .config import LOSSES, TrainConfig

_CHOICES = {"loss": LOSSES, "schedule": ("linear", "constant")}

_HELP = {
    "model": "local Hugging Face causal-LM folder (the aligned chat model, with its tokenizer and chat template)",
    "data": "JSONL rows: {prompt, response} or {messages}; rs rows add `safe`; dss rows add `star_values` and "
            "`star_chunk_words` (from `safeshape star`)",
    "out": "output folder: final adapter (PEFT layout), metrics.jsonl, checkpoint-<step>/",
    "loss": "dss (STAR-weighted CE + KL to the adapter-disabled model), sft, rs (sft on the rows with safe=true), "
            "or deep-token (Qi et al.'s token-wise constrained objective against the adapter-disabled model)",
    "kl_coef": "lambda of the DSS KL term",
    "deep_token_betas": "deep-token: comma-separated beta of response positions 1, 2, ...; the last holds for every "
                        "later position",
    "rs_keep_rejected": "rs: keep rejected rows with weight 0 and count their tokens in N (the old behaviour) "
                        "instead of dropping them as the authors do",
    "target_modules": "comma-separated Linear names to adapt",
    "batch_size": "rows per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step",
    "max_len": "tokens per row (longer rows are cut at the end)",
    "bf16": "load the base weights in bfloat16",
    "save_every": "checkpoint every N optimizer steps (0: only at the end)",
    "resume": "continue from the newest checkpoint in --out (starts fresh when there is none)",
    "overwrite": "replace an existing --out",
    "max_steps": "optimizer steps to run, instead of --epochs (sets the schedule length)",
    "device": "cpu or cuda (under torchrun: cuda:LOCAL_RANK)",
    "progress": "progress bar (--no-progress to hide)",
    "fused": "fused lm-head loss (--no-fused forms the logits, for comparison)",
    "schedule": "linear (decay to 0 after warmup) or constant",
    "max_grad_norm": "gradient clipping norm (0: off)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = _HELP.get(f.name, "")
        if f.default is MISSING:
            parser.add_argument(flag, required=True, help=help_text)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, default=",".join(str(x) for x in f.default),
                                help=help_text + " (default %(default)s)")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            parser.add_argument(flag, type=kind, default=f.default, choices=_CHOICES.get(f.name),
                                help=(help_text + " (default %(default)s)").strip())
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line")


def main(args: argparse.Namespace) -> int:
    from .loop import train

    try:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        summary = train(config)
    except SafeshapeError as exc:
        print(f"safeshape train: error: {exc}", file=sys.stderr)
        return 2
    if summary["rank"]:
        return 0
    resumed = f" (resumed at step {summary['resumed_from']})" if summary["resumed_from"] is not None else ""
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    print(f"trained {summary['steps']} steps{resumed}, final loss {loss}, adapter in {summary['out']}",
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
