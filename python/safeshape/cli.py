"""The ``safeshape`` command line. Each subcommand lives in its feature's module, which provides
``add_arguments(parser)`` and ``main(args) -> int``; this file only lists them."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import SafeshapeError

# (name, module, one-line help); a module is imported only when its subcommand runs
SUBCOMMANDS = [
    ("project", "safeshape.safelora.cli", "Safe LoRA: project a PEFT LoRA adapter onto the alignment subspace"),
    ("star", "safeshape.star.cli", "STAR: annotate a JSONL dataset with per-chunk P(safe) from a local guard model"),
    ("train", "safeshape.trainer.cli", "LoRA fine-tuning with the SFT, RS or DSS (STAR-weighted) loss; torchrun for DDP"),
    ("eval", "safeshape.eval.cli", "Safety (guard harmful rate, refusal rate) and utility of a model and its adapters"),
    ("demo", "safeshape.demo.cli", "Toy world on CPU: align, fine-tune with each method, score safety and utility"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeshape", description="Keep an aligned LLM's refusals through LoRA "
                                     "fine-tuning (Safe LoRA, STAR, DSS).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except (SafeshapeError, OSError) as exc:  # bad input or an unwritable output: a message, not a traceback
        print(f"safeshape {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
