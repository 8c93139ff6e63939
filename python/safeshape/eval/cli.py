"""``safeshape eval``: harmful rate, refusal rate and utility of a model and its adapters, side by side."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ..io import json_main, print_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..star.presets import USABLE_PRESET_NAMES
    from ..safelora.selection import parse_num_layers
    from .prompts import DTYPES, UTILITY_METRICS

    a = parser.add_argument
    a("--model", required=True, action="append", metavar="[NAME=]DIR",
      help="a Hugging Face chat model: a folder, or a hub id read through the HF cache. Repeat for several, all in "
           "one report and plot (e.g. --model base=BASE --model aligned=ALIGNED); a lone unnamed one is 'base', "
           "several are named after their folders")
    a("--adapter", dest="adapters", action="append", default=[], metavar="[NAME=]DIR",
      help="a PEFT LoRA adapter on the last --model (or --adapter-model): repeat for several, e.g. the trained one "
           "and its `safeshape project` output (name it NAME+safelora and --project-base will not project it again)")
    a("--adapter-model", default=None, metavar="NAME",
      help="the --model NAME the adapters go on (default: the last --model; Safe LoRA assumes the aligned one)")
    a("--harmful", required=True, metavar="PROMPTS",
      help="harmful prompts: AdvBench harmful_behaviors.csv (goal,target), a CSV/JSONL with a `prompt` column "
           "(and optional `category`), or a folder of files, one per category (HEx-PHI)")
    a("--out", required=True, metavar="OUT", help="output folder: responses.jsonl, eval_report.json, eval_plot.png; "
      "a rerun with the same settings resumes")
    a("--guard", default=None, metavar="DIR|HUB_ID",
      help="guard model: a folder, or a hub id read through the HF cache (harmful rate = P(unsafe) > 0.5)")
    a("--preset", default="llama-guard-3", choices=USABLE_PRESET_NAMES, help="guard verdict format (default llama-guard-3)")
    a("--safe", default=None, metavar="STR", help="safe verdict string (generic preset)")
    a("--unsafe", default=None, metavar="STR", help="unsafe verdict string (generic preset)")
    a("--verdict-prefix", default=None, metavar="STR", help="text the guard writes before its verdict (generic)")
    a("--guard-batch-size", type=int, default=8, metavar="N", help="responses per guard pass (default 8)")
    a("--guard-temperature", type=float, default=1.0, help="verdict softmax temperature (default 1)")
    a("--project-base", default=None, metavar="DIR|NAME",
      help="also evaluate each adapter after Safe LoRA (`safeshape project` with this unaligned base, a folder, hub "
           "id or the NAME of a --model, and the adapters' model as the aligned model), written to "
           "OUT/projected/NAME; adapters that are projections already are not projected again")
    a("--project-select", default="number", choices=("number", "threshold"), help="Safe LoRA selection (default number)")
    a("--project-num-layers", type=parse_num_layers, default=10, metavar="K|F",
      help="Safe LoRA in number mode: a count K or a fraction F in (0, 1) of each adapter's modules (default 10)")
    a("--project-threshold", type=float, default=0.5, metavar="TAU", help="Safe LoRA tau in threshold mode (0.5)")
    a("--utility", default=None, metavar="TASK.jsonl", help="utility rows {prompt, answer[, metric]}")
    a("--utility-metric", default="exact", choices=UTILITY_METRICS,
      help="exact (equal after whitespace normalisation) or contains (default exact)")
    a("--lm-eval", default=None, metavar="TASKS", help="lm-eval-harness tasks, comma-separated (needs lm-eval)")
    a("--lm-eval-limit", type=int, default=None, metavar="N", help="examples per lm-eval task")
    a("--lm-eval-include", action="append", default=[], metavar="DIR",
      help="a folder of lm-eval task YAMLs (local data files, no hub) searched for --lm-eval's tasks (repeat for "
           "several; docs/engines.md)")
    a("--prompt-column", default=None, metavar="NAME", help="prompt column (default: prompt, else goal)")
    a("--limit", type=int, default=None, metavar="N", help="a random subset of N harmful prompts (see --seed)")
    a("--seed", type=int, default=0, help="seed of --limit's subset and of sampling (default 0)")
    a("--max-new-tokens", type=int, default=256, metavar="N", help="tokens per response (default 256)")
    a("--batch-size", type=int, default=16, metavar="N", help="prompts per generation batch (default 16)")
    a("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    a("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    a("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (under torchrun: "
      "cuda:LOCAL_RANK); default auto")
    a("--dtype", default="float32", choices=DTYPES, help="model and guard dtype (default float32)")
    a("--engine", default="hf", choices=("hf", "vllm"),
      help="hf: transformers' generate (default); vllm: one vLLM engine for the model and its adapters (LoRA "
           "requests) and one for the guard (needs vLLM; docs/engines.md)")
    a("--tensor-parallel-size", type=int, default=1, metavar="N", help="--engine vllm: devices a model is split over")
    a("--data-parallel-size", type=int, default=1, metavar="N",
      help="--engine vllm: N engine replicas, each on its own devices (N x --tensor-parallel-size GPUs, or on a "
           "CPU its own cores), the prompts split between them (default 1; docs/engines.md)")
    a("--overwrite", action="store_true", help="start OUT afresh instead of resuming it")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a("--json", action="store_true", help="print the report as JSON instead of the table")


@json_main
def main(args: argparse.Namespace) -> int:
    from ..errors import SafeshapeError
    from .report import table
    from .run import EvalConfig, run_eval

    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)})
    cfg.progress = cfg.progress and sys.stderr.isatty()
    try:
        report = run_eval(cfg, log=lambda m: print(m, file=sys.stderr))
    except SafeshapeError as exc:
        print(f"safeshape eval: error: {exc}", file=sys.stderr)
        return 2
    if not report:  # not process 0
        return 0
    if args.json:
        print_json(report, indent=2)
    else:
        print(table(report))
        plot = f"   plot: {args.out}/{report['plot']}" if report["plot"] else ""
        print(f"\nreport: {args.out}/eval_report.json   responses: {args.out}/responses.jsonl{plot}")
    return 0
