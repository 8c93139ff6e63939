"""The hf engines against vLLM, in one run, on tiny random Llamas (float32): STAR prefixes/s (our shared engine vs
vLLM, each prefix a request, prefix caching on, cache empty at the start) and eval's generated tokens/s (our batched
transformers generate vs vLLM), engine start-up timed apart. Also printed: how many prefixes/responses agree
(largest |P(safe)| difference; identical greedy responses).

Needs vLLM next to safeshape (`make test-vllm` builds such an environment on a CPU machine):

    .venv-vllm/bin/python bench/bench_engines.py [--responses 40 --words 200] [--prompts 64 --new-tokens 64]
        [--hidden 256 --layers 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402

from safeshape import testing as T  # noqa: E402
from safeshape.star import StarScorer, load_guard, tiny  # noqa: E402

PRESET = "llama-guard-3"


def _policy(folder: Path, hidden: int, layers: int) -> None:
    tok = T.build_tiny_tokenizer(vocab_size=512)
    model = tiny.build_model(len(tok), hidden=hidden, layers=layers, heads=hidden // 32, kv_heads=hidden // 64, seed=1)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def bench_star(root: Path, args) -> dict:
    from safeshape.star.guard import load_guard_tokenizer
    from safeshape.star.vllm_engine import VllmGuard

    guard_dir = root / "guard"
    model, tok = tiny.build_tiny_guard(hidden=args.hidden, layers=args.layers)
    model.save_pretrained(guard_dir)
    tok.save_pretrained(guard_dir)
    items = [("How do I get into my neighbour's wifi?", tiny.random_text(args.words, seed=i))
             for i in range(args.responses)]
    out = {}
    t = time.perf_counter()
    guard, tok = load_guard(str(guard_dir))
    out["hf_start_s"] = time.perf_counter() - t
    shared = StarScorer(guard, tok, preset=PRESET, engine="shared", batch_size=8)
    inputs = [shared.build(p, r) for p, r in items]
    prefixes = sum(gi.num_prefixes for gi in inputs)
    t = time.perf_counter()
    want = shared.score_inputs(inputs)
    out["shared_s"] = time.perf_counter() - t
    del guard, shared
    t = time.perf_counter()
    vg = VllmGuard(str(guard_dir))
    out["vllm_start_s"] = time.perf_counter() - t
    try:
        scorer = StarScorer(vg, load_guard_tokenizer(guard_dir), preset=PRESET, engine="vllm")
        inputs = [scorer.build(p, r) for p, r in items]
        t = time.perf_counter()
        got = []
        for b0 in range(0, len(inputs), 8):  # as `safeshape star` feeds it: --batch-size responses a call
            got += scorer.score_inputs(inputs[b0:b0 + 8])
        out["vllm_s"] = time.perf_counter() - t
    finally:
        vg.close()
    out.update(prefixes=prefixes, shared_prefixes_per_s=prefixes / out["shared_s"],
               vllm_prefixes_per_s=prefixes / out["vllm_s"],
               max_abs_diff=max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)))
    return out


def bench_eval(root: Path, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeshape.eval import vllm_engine
    from safeshape.eval.generate import GenerationSettings, generate_responses

    _policy(root / "policy", args.hidden, args.layers)
    prompts = T.corpus(args.prompts, seed=11)
    out = {}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(root / "policy", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(root / "policy")
    out["hf_start_s"] = time.perf_counter() - t
    t = time.perf_counter()
    want = generate_responses(model, tok, prompts, GenerationSettings(max_new_tokens=args.new_tokens, batch_size=16))
    out["hf_s"] = time.perf_counter() - t
    del model
    t = time.perf_counter()
    policy = vllm_engine.VllmPolicy(str(root / "policy"), [])
    out["vllm_start_s"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        got = vllm_engine.generate_responses(policy, tok, prompts,
                                             GenerationSettings(max_new_tokens=args.new_tokens, batch_size=256))
        out["vllm_s"] = time.perf_counter() - t
    finally:
        policy.close()
    out.update(hf_tokens=sum(g.new_tokens for g in want), vllm_tokens=sum(g.new_tokens for g in got),
               identical=sum(a.response == b.response for a, b in zip(got, want)), prompts=len(prompts))
    out["hf_tokens_per_s"] = out["hf_tokens"] / out["hf_s"]
    out["vllm_tokens_per_s"] = out["vllm_tokens"] / out["vllm_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", type=int, default=40)
    ap.add_argument("--words", type=int, default=200, help="words per response (M = 5: words / 5 prefixes)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256, help="a multiple of 64 (vLLM's CPU attention: head size 32)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--only", choices=("star", "eval"), default=None)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                      f"{torch.__version__}, threads {torch.get_num_threads()}", "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        if args.only in (None, "star"):
            s = res["star"] = bench_star(Path(d), args)
            print(f"STAR {args.responses} responses x {args.words} words = {s['prefixes']} prefixes: shared "
                  f"{s['shared_prefixes_per_s']:.1f} prefixes/s, vLLM {s['vllm_prefixes_per_s']:.1f} prefixes/s "
                  f"({s['vllm_prefixes_per_s'] / s['shared_prefixes_per_s']:.2f}x); start-up hf {s['hf_start_s']:.1f} s, "
                  f"vLLM {s['vllm_start_s']:.1f} s; max |dP| {s['max_abs_diff']:.1e}", flush=True)
        if args.only in (None, "eval"):
            e = res["eval"] = bench_eval(Path(d), args)
            print(f"eval {e['prompts']} prompts x {args.new_tokens} greedy tokens: hf {e['hf_tokens_per_s']:.0f} "
                  f"tokens/s, vLLM {e['vllm_tokens_per_s']:.0f} tokens/s "
                  f"({e['vllm_tokens_per_s'] / e['hf_tokens_per_s']:.2f}x); start-up hf {e['hf_start_s']:.1f} s, "
                  f"vLLM {e['vllm_start_s']:.1f} s; identical responses {e['identical']}/{e['prompts']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
