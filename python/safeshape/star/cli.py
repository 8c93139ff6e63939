"""``safeshape star``: annotate a JSONL dataset with STAR values from a guard model (a folder or a hub id)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from pathlib import Path

from ..errors import SafeshapeError
from ..io import json_main, print_json, refuse_link, write_json
from .presets import ENGINES, RECIPES, USABLE_PRESET_NAMES, get_preset

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
    parser.add_argument("--preset", default="llama-guard-3", choices=USABLE_PRESET_NAMES,
                        help="guard verdict format (default: llama-guard-3)")
    parser.add_argument("--safe", default=None, metavar="STR", help="the safe verdict string (generic preset)")
    parser.add_argument("--unsafe", default=None, metavar="STR", help="the unsafe verdict string (generic preset)")
    parser.add_argument("--verdict-prefix", default=None, metavar="STR",
                        help="text the guard writes before the verdict (generic preset; e.g. a blank line)")
    parser.add_argument("--chunk-words", type=int, default=5, metavar="M", help="words per chunk (default: 5)")
    parser.add_argument("--engine", default="shared", choices=ENGINES,
                        help="shared: one guard pass per response (default); naive: one pass per prefix; vllm: "
                             "each prefix a vLLM request, prefix caching on (needs vLLM; docs/engines.md)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="--engine vllm: devices the guard is split over (default 1)")
    parser.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                        help="--engine vllm: N guard engine replicas, each on its own devices (N x "
                             "--tensor-parallel-size GPUs, or on a CPU its own cores), the prefixes split between "
                             "them (default 1; docs/engines.md)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="guard sequences per forward pass: responses (shared) or prefixes (naive)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="guard dtype (default: float32)")
    parser.add_argument("--temperature", type=float, default=1.0, help="verdict softmax temperature (default: 1)")
    parser.add_argument("--recipe", default="exact", choices=RECIPES,
                        help="exact: P(safe) from the guard's verdict logits on the exact prefix text (default); "
                             "authors: the STAR authors' scripts (whitespace-normalised prefixes, their sampling "
                             "processors; docs/math.md#star-authors-recipe)")
    parser.add_argument("--guard-date", default=None, metavar="YYYY-MM-DD",
                        help="the date a guard template prints (Granite Guardian 3.1 puts today's date in its system "
                             "block); default today; reported, so a rerun can pin it")
    parser.add_argument("--overwrite", action="store_true", help="start OUT afresh instead of resuming it")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is off anyway when stderr is not a terminal)")
    parser.add_argument("--report", default=None, metavar="PATH", help="also write the JSON report to PATH")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON line on stdout (the summary goes to stderr)")


@json_main
def main(args: argparse.Namespace) -> int:
    """One process, or (under ``torchrun``) one rank of a sharded run: rank r annotates rows r, r + N, ... into
    its own resumable part ``OUT.part-r-of-N``; rank 0 then merges the parts into OUT in input order."""
    try:
        if args.preset != "generic" and (args.safe or args.unsafe):
            print(f"note: --safe/--unsafe override the {args.preset} preset's verdict strings", file=sys.stderr)
        preset = get_preset(args.preset, safe=args.safe, unsafe=args.unsafe, verdict_prefix=args.verdict_prefix)
        guard_date = _parse_date(args.guard_date)
        refuse_link(args.out, "--out")  # a link (dangling too) would be written through, wherever it points
        if args.report:
            refuse_link(args.report, "--report")
        if args.report and Path(args.report).exists() and not args.overwrite:
            raise SafeshapeError(f"--report {args.report} exists; pass --overwrite to replace it")
        if args.device == "auto":  # as train's: cuda when available
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.no_progress = args.no_progress or not sys.stderr.isatty()  # no bars in logs
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise SafeshapeError(f"--device {args.device}: no CUDA device is available")
        if args.data_parallel_size != 1 and args.engine != "vllm":
            raise SafeshapeError("--data-parallel-size is for --engine vllm (the other engines run data parallel "
                                 "under torchrun)")
    except SafeshapeError as exc:
        print(f"safeshape star: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if args.engine == "vllm":
            from ..vllm_support import TORCHRUN

            print(f"safeshape star: error: {TORCHRUN}", file=sys.stderr)
            return 2
        return _main_sharded(args, preset, guard_date)
    try:
        report = _annotate(args, preset, guard_date, args.device, args.out, (0, 1), not args.no_progress)
    except SafeshapeError as exc:
        print(f"safeshape star: error: {exc}", file=sys.stderr)
        return 2
    _print_report(args, report)
    return 0


def _annotate(args, preset, guard_date, device, out, shard, progress) -> dict:
    import torch

    from .annotate import annotate_file
    from .guard import load_guard

    if args.engine == "vllm":
        from ..hub import resolve_folder
        from .guard import load_guard_tokenizer
        from .vllm_engine import VllmGuard

        folder = resolve_folder(args.guard, "--guard")
        tokenizer = load_guard_tokenizer(folder, "--guard")
        guard = VllmGuard(folder, recipe=args.recipe, dtype=DTYPES[args.dtype],
                          tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size)
    else:
        guard, tokenizer = load_guard(args.guard, device=device, dtype=getattr(torch, DTYPES[args.dtype]))
    try:
        return annotate_file(guard, tokenizer, args.data, out, preset, chunk_words=args.chunk_words,
                         engine=args.engine, batch_size=args.batch_size, temperature=args.temperature,
                         progress=progress, overwrite=args.overwrite, guard_date=guard_date, recipe=args.recipe,
                         shard=shard)
    finally:
        if args.engine == "vllm":
            guard.close()


def _main_sharded(args, preset, guard_date) -> int:
    from ..distributed import setup
    from .annotate import merge_shards

    d = setup(args.device)
    out = Path(args.out)
    parts = [out.with_name(f"{out.name}.part-{r}-of-{d.world_size}") for r in range(d.world_size)]
    guard_date = d.gather_objects(guard_date or datetime.date.today())[0]  # one date for every rank
    error, report = None, None
    try:
        if out.exists() and not args.overwrite:
            raise SafeshapeError(f"--out {out} exists: a multi-process run writes OUT once, at the end, from the "
                                 f"per-rank parts ({out.name}.part-R-of-{d.world_size}, which resume); pass "
                                 "--overwrite to replace it, or choose another output")
        report = _annotate(args, preset, guard_date, str(d.device), parts[d.rank], (d.rank, d.world_size),
                           not args.no_progress and d.is_main)
    except SafeshapeError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 -- any error of one rank is every rank's: none waits in a collective
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    results = d.gather_objects((error, report))  # every rank reaches this collective, whatever happened on it
    code = 0
    if d.is_main:
        errors = [(r, e) for r, (e, _) in enumerate(results) if e]
        for r, e in errors:
            print(f"safeshape star: error: rank {r}: {e}", file=sys.stderr)
        if not errors:
            try:
                merge_shards(args.data, parts, out, overwrite=args.overwrite)
                reports = [rep for _, rep in results]
                merged = dict(reports[0], output=str(out), world_size=d.world_size,
                              seconds=max(rep["seconds"] for rep in reports))
                for key in ("rows_scored", "rows_skipped", "rows_with_system", "shared_fallbacks", "guard_tokens",
                            "guard_slots", "forward_passes", "chunks", "verdicts_both_masked"):
                    merged[key] = sum(rep[key] for rep in reports)
                for p in parts:
                    p.unlink()
                _print_report(args, merged)
            except Exception as exc:  # noqa: BLE001 -- reported, and the other ranks still get the exit code
                print(f"safeshape star: error: {exc if isinstance(exc, SafeshapeError) else repr(exc)}",
                      file=sys.stderr)
                code = 2
        else:
            code = 2
    code = max(d.gather_objects(code))  # every rank exits with the same status
    d.close()
    return code


def _print_report(args, report: dict) -> None:
    report["guard"] = str(args.guard)
    seconds = report["seconds"] if report["seconds"] > 0 else float("inf")
    report["responses_per_s"] = report["rows_scored"] / seconds
    report["guard_tokens_per_s"] = report["guard_tokens"] / seconds
    print(f"STAR: scored {report['rows_scored']} rows ({report['rows_skipped']} already done) -> {report['output']}; "
          f"{report['guard_tokens']} guard tokens, {report['seconds']:.1f} s ({report['responses_per_s']:.2f} "
          f"responses/s, {report['guard_tokens_per_s']:.0f} guard tokens/s), engine {report['engine']}, "
          f"M = {report['chunk_words']}", file=sys.stderr if args.json else sys.stdout)
    notes = []
    if report["rows_with_system"]:
        notes.append(f"{report['rows_with_system']} rows had a system message (not shown to the guard)")
    if report["shared_fallbacks"]:
        notes.append(f"{report['shared_fallbacks']} responses scored one prefix at a time (their prefixes' tokens "
                     "share too little with the response's)")
    if report["verdicts_both_masked"]:
        notes.append(f"{report['verdicts_both_masked']} prefixes had both verdict tokens masked by the authors' "
                     "top-k/top-p (NaN in their scripts; here the softmax of the two unmasked scores)")
    if report["guard_date"]:
        notes.append(f"guard template date {report['guard_date']} (pin it with --guard-date to reproduce)")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json(report, sort_keys=True)
    if args.report:
        write_json(args.report, report, overwrite=True)


def _parse_date(text: str | None) -> datetime.date | None:
    if text is None:
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise SafeshapeError(f"--guard-date {text!r}: expected a date as YYYY-MM-DD") from None
