"""``safeshape star``: annotate a JSONL dataset with STAR values from a local guard model."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SafeshapeError
from .presets import ENGINES, PRESET_NAMES, get_preset

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guard", required=True, metavar="DIR|HUB_ID",
                        help="Hugging Face guard model: a folder, or a hub id read through the HF cache "
                             "(HF_HUB_OFFLINE=1: the cache only)")
    parser.add_argument("--data", required=True, metavar="IN.jsonl",
                        help="rows {prompt, response} or {messages: [...]} (last message = assistant response)")
    parser.add_argument("--out", required=True, metavar="OUT.jsonl",
                        help="output rows: the input fields + star_values + star_chunk_words; an existing OUT that "
                             "holds the first rows of this run is resumed")
    parser.add_argument("--preset", default="llama-guard-3", choices=PRESET_NAMES,
                        help="guard verdict format (default: llama-guard-3)")
    parser.add_argument("--safe", default=None, metavar="STR", help="the safe verdict string (generic preset)")
    parser.add_argument("--unsafe", default=None, metavar="STR", help="the unsafe verdict string (generic preset)")
    parser.add_argument("--verdict-prefix", default=None, metavar="STR",
                        help="text the guard writes before the verdict (generic preset; e.g. a blank line)")
    parser.add_argument("--chunk-words", type=int, default=5, metavar="M", help="words per chunk (default: 5)")
    parser.add_argument("--engine", default="shared", choices=ENGINES,
                        help="shared: one guard pass per response (default); naive: one pass per prefix")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="guard sequences per forward pass: responses (shared) or prefixes (naive)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="guard dtype (default: float32)")
    parser.add_argument("--temperature", type=float, default=1.0, help="verdict softmax temperature (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="start OUT afresh instead of resuming it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the JSON report to PATH")


def main(args: argparse.Namespace) -> int:
    import torch

    from .annotate import annotate_file
    from .guard import load_guard

    try:
        if args.preset != "generic" and (args.safe or args.unsafe):
            print(f"note: --safe/--unsafe override the {args.preset} preset's verdict strings", file=sys.stderr)
        preset = get_preset(args.preset, safe=args.safe, unsafe=args.unsafe, verdict_prefix=args.verdict_prefix)
        if args.json and Path(args.json).exists() and not args.overwrite:
            raise SafeshapeError(f"--json {args.json} exists; pass --overwrite to replace it")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SafeshapeError(f"--device {args.device}: no CUDA device is available")
        guard, tokenizer = load_guard(args.guard, device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
        report = annotate_file(guard, tokenizer, args.data, args.out, preset, chunk_words=args.chunk_words,
                               engine=args.engine, batch_size=args.batch_size, temperature=args.temperature,
                               progress=not args.no_progress, overwrite=args.overwrite)
    except SafeshapeError as exc:
        print(f"safeshape star: error: {exc}", file=sys.stderr)
        return 2
    report["guard"] = str(args.guard)
    rate = report["guard_tokens"] / report["seconds"] if report["seconds"] > 0 else 0.0
    print(f"STAR: scored {report['rows_scored']} rows ({report['rows_skipped']} already done) -> {report['output']}; "
          f"{report['guard_tokens']} guard tokens, {report['seconds']:.1f} s ({rate:.0f} tokens/s), "
          f"engine {report['engine']}, M = {report['chunk_words']}")
    line = json.dumps(report, sort_keys=True)
    print(line)
    if args.json:
        target = Path(args.json)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(target)
    return 0
