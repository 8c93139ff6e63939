"""`safeshape eval` throughput: batched generation (left padding, KV cache) vs one prompt at a time, and guard
judging, on tiny random Llamas built in code.

Both generation modes run the same prompts in the same run, interleaved (--repeat rounds, median); printed: prompts/s
of each, the ratio, and whether the responses are identical (greedy). Then the guard: a tiny random guard with a
Llama-Guard-3-like template (a ~400-token policy head) judges the batched responses; printed: responses/s and
guard tokens/s.

    PYTHONPATH=python python bench/bench_eval.py [--prompts 64] [--batch-size 16] [--max-new-tokens 32]
        [--threads 1] [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from safeshape import testing
from safeshape.eval import GenerationSettings, GuardJudge, generate_responses
from safeshape.star import tiny


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--guard-batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device

    tok = testing.build_tiny_tokenizer(vocab_size=512)
    model = testing.build_tiny_llama(len(tok), hidden_size=args.hidden, num_layers=args.layers, seed=0,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id).to(dev)
    prompts = testing.corpus(args.prompts, seed=11)
    isa = torch.backends.cpu.get_cpu_capability()
    cpu = platform.processor() or platform.machine()
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if dev.startswith('cuda') else cpu}, ISA {isa}) "
          f"threads={torch.get_num_threads()} torch={torch.__version__}; policy hidden={args.hidden} "
          f"layers={args.layers} vocab={len(tok)}; {args.prompts} prompts, max_new_tokens={args.max_new_tokens}, "
          "greedy")

    def run(batch_size):
        s = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        gens = generate_responses(model, tok, prompts, s)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, gens

    run(args.batch_size)  # warm-up
    t_batched, t_single = [], []
    for _ in range(args.repeat):  # interleaved, so both see the same machine load
        tb, batched = run(args.batch_size)
        ts, single = run(1)
        t_batched.append(tb)
        t_single.append(ts)
    tb, ts = statistics.median(t_batched), statistics.median(t_single)
    same = [g.response for g in batched] == [g.response for g in single]
    tokens = sum(g.new_tokens for g in batched)
    print(f"{'mode':>22} {'s':>7} {'prompts/s':>9} {'tokens/s':>9}")
    print(f"{'one prompt at a time':>22} {ts:>7.2f} {args.prompts / ts:>9.1f} {tokens / ts:>9.0f}")
    print(f"{f'batched ({args.batch_size})':>22} {tb:>7.2f} {args.prompts / tb:>9.1f} {tokens / tb:>9.0f}")
    print(f"speedup {ts / tb:.2f}x (target >= 4x at batch 16 on CPU); identical responses: {same}; "
          f"{tokens} new tokens, {sum(not g.finished for g in batched)} cut at max_new_tokens")

    guard, gtok = tiny.build_tiny_guard(hidden=args.hidden, layers=args.layers)
    judge = GuardJudge(guard.to(dev), gtok, "llama-guard-3", batch_size=args.guard_batch_size)
    items = [(p, g.response if g.response.split() else "ok") for p, g in zip(prompts, batched)]
    judge.p_unsafe(items[: args.guard_batch_size])  # warm-up
    before = judge.summary()
    t = time.perf_counter()
    judge.p_unsafe(items)
    tj = time.perf_counter() - t
    gtokens = judge.summary()["guard_tokens"] - before["guard_tokens"]
    print(f"guard judging (batch {args.guard_batch_size}, tiny Llama-Guard-like template): {len(items)} responses in "
          f"{tj:.2f} s = {len(items) / tj:.1f} responses/s, {gtokens / tj:.0f} guard tokens/s "
          f"({gtokens / len(items):.0f} tokens a response)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "isa": isa, "threads": torch.get_num_threads(), "single_s": t_single,
                       "batched_s": t_batched, "speedup": ts / tb, "identical": same, "new_tokens": tokens,
                       "guard_s": tj, "guard_responses": len(items), "guard_tokens": gtokens}, f, indent=2)


if __name__ == "__main__":
    main()
