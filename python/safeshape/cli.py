"""The ``safeshape`` command line. Each subcommand lives in its feature's module, which provides
``add_arguments(parser)`` and ``main(args) -> int``; this file only lists them.

Only the chosen subcommand's module is imported (``safeshape --help`` imports none), and those modules import
torch and transformers inside ``main``, so ``--help`` answers at once."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import SafeshapeError  # no imports of its own: --help stays light

# (name, module, one-line help); a module is imported only when its subcommand is chosen
SUBCOMMANDS = [
    ("project", "safeshape.safelora.cli", "Safe LoRA: project a PEFT LoRA adapter onto the alignment subspace"),
    ("star", "safeshape.star.cli", "STAR: annotate a JSONL dataset with per-chunk P(safe) from a guard model"),
    ("train", "safeshape.trainer.cli", "LoRA fine-tuning with the SFT, RS, DSS (STAR-weighted) or Deep Token loss; "
                                       "torchrun for DDP"),
    ("eval", "safeshape.eval.cli", "Safety (guard harmful rate, refusal rate) and utility of models and their "
                                   "adapters, side by side"),
    ("demo", "safeshape.demo.cli", "Toy world on CPU: align, fine-tune with each method, score safety and utility"),
]


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default X)`` to a flag's help unless the help already names its default, or it has none worth
    showing (``None``, ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if ("default" in help_text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action.default, bool)):
            return help_text
        return f"{help_text} (default %(default)s)".strip()


def _version() -> str:
    from . import __version__

    try:  # written at build time, no torch needed to read it
        from . import _build_config as b
    except ImportError:  # pragma: no cover - a checkout without a build
        return f"safeshape {__version__} (native extension not built)"
    cuda = f"CUDA {b.TORCH_CUDA_VERSION}" if b.WITH_CUDA else "CPU only"
    return f"safeshape {__version__} (built for torch {b.TORCH_VERSION}, {cuda})"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s subparser gets its arguments (``None``: every subcommand's, e.g. for docs)."""
    parser = argparse.ArgumentParser(prog="safeshape", description="Keep an aligned LLM's refusals through LoRA "
                                     "fine-tuning (Safe LoRA, STAR, DSS).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option (global options take no
    value)."""
    return next((a for a in argv if not a.startswith("-")), None)


# Third-party warnings that every run would print and that say nothing about the user's run (the command line
# only: a library user's filters are theirs). PEFT reads transformers' deprecated `is_gradient_checkpointing`
# whenever it wraps a model (peft 0.17/0.18 with transformers 5).
QUIET_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]


def main(argv: list[str] | None = None) -> int:
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    command = _chosen(argv)
    args = build_parser(command or "").parse_args(argv)
    try:
        with warnings.catch_warnings():
            for category, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            return int(importlib.import_module(args._module).main(args) or 0)
    except (SafeshapeError, OSError) as exc:  # bad input or an unwritable output: a message, not a traceback
        print(f"safeshape {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
