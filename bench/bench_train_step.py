"""One DSS training step of `safeshape train` (LoRA on q/v, reference pass with the adapter disabled, loss,
backward, AdamW) on a tiny Llama with a 32000-token vocabulary: the fused lm-head loss ops against the same step
with the logits formed (native unfused ops) and with a plain-torch loss (log_softmax + gather). Step time and
peak extra memory, printed as ratios to the plain-torch step, all measured in this one run.

Each variant runs in its own child process so that its peak memory is its own (CPU: peak RSS over the RSS after
set-up; CUDA: torch.cuda.max_memory_allocated over the allocation after set-up); the children of the variants are
interleaved over --rounds; a variant's time is its best round's median step, its time ratio the median over
rounds of its ratio to the plain-torch child of the same round.

    PYTHONPATH=python python bench/bench_train_step.py [--device cpu|cuda] [--steps 5] [--rows 8]
        [--rounds 3] [--hidden 256] [--layers 2] [--vocab 32000] [--max-len 256] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("fused", "unfused", "torch")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from safeshape.trainer import TrainConfig
    from safeshape.trainer.distributed import setup
    from safeshape.trainer.loop import Run

    class PlainDSSLoss(nn.Module):
        """docs/math.md#dss-loss in plain torch, from materialised logits."""

        def __init__(self, kl_coef):
            super().__init__()
            self.kl_coef = kl_coef

        def forward(self, *, logits, labels, weights, ref_logprobs, num_items_in_batch, **_):
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
            valid = labels != -100
            w = weights.float()
            per = w * (-lp) + self.kl_coef * (1 - w) * 0.5 * (lp - ref_logprobs) ** 2
            per = torch.where(valid, per, torch.zeros_like(per))
            n = num_items_in_batch
            zero = per.new_zeros(())
            return type("Out", (), dict(loss=per.sum() / n, sft_loss=zero, kl_loss=zero, num_tokens=valid.sum(),
                                        mean_weight=zero))

    class PlainRun(Run):
        def reference_logprobs(self, hidden, labels):
            logits = F.linear(hidden, self.lm_head_weight).float()
            return torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]

    torch.manual_seed(0)
    config = TrainConfig(model=args.model, data=args.data, out=os.path.join(args.tmp, "out-" + args.variant),
                         loss="dss", batch_size=args.rows, max_len=args.max_len, progress=False,
                         fused=args.variant == "fused", device=args.device, lr=1e-4)
    run = (PlainRun if args.variant == "torch" else Run)(config, setup(args.device))
    if args.variant == "torch":
        run.loss_module = PlainDSSLoss(config.kl_coef)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run.train_step(0)  # warm-up; LoRA B moves off 0 so the KL term is live
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    times, tokens = [], 0
    for s in range(1, args.steps + 1):
        t0 = time.perf_counter()
        m = run.train_step(s % run.steps_per_epoch)
        sync()
        times.append(time.perf_counter() - t0)
        tokens = m["tokens"]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    return {"variant": args.variant, "step_s": statistics.median(times), "step_s_all": times,
            "peak_extra_mib": peak - base, "loss_tokens": tokens, "threads": torch.get_num_threads()}


def parent(args) -> dict:
    from safeshape import testing

    with tempfile.TemporaryDirectory() as tmp:
        model = testing.save_tiny_model(os.path.join(tmp, "model"), hidden_size=args.hidden, num_layers=args.layers,
                                        vocab_size=512, model_vocab_size=args.vocab)
        rows = testing.tiny_rows(args.rows, "dss", seed=1)
        words = " ".join(testing.corpus(n=400, seed=9)).split()
        with open(os.path.join(tmp, "rows.jsonl"), "w") as f:
            for i, row in enumerate(rows):  # long responses: every row fills --max-len
                response = " ".join(words[i * 300:(i + 1) * 300])
                n_chunks = -(-len(response.split()) // 5)
                row.update(response=response, star_values=[(k % 7) / 6 for k in range(n_chunks)])
                f.write(json.dumps(row) + "\n")
        runs = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):  # interleaved, so load from other jobs hits every variant alike
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--child", variant, "--model", str(model), "--data",
                       os.path.join(tmp, "rows.jsonl"), "--tmp", tmp, "--device", args.device, "--steps",
                       str(args.steps), "--rows", str(args.rows), "--max-len", str(args.max_len)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"variant {variant} failed")
                runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # per variant: the best round's median step time (least disturbed), the median round's peak memory; the time
    # ratio is the median over rounds of the ratio within a round (neighbouring children see similar load)
    results = {v: {"step_s": min(r["step_s"] for r in rs),
                   "peak_extra_mib": statistics.median(r["peak_extra_mib"] for r in rs),
                   "loss_tokens": rs[0]["loss_tokens"], "rounds": rs} for v, rs in runs.items()}
    ref = results["torch"]
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores, device {args.device}",
              "shape": {"rows": args.rows, "max_len": args.max_len, "hidden": args.hidden, "layers": args.layers,
                        "vocab": args.vocab, "loss_tokens_per_step": ref["loss_tokens"]},
              "results": results,
              "ratios_vs_plain_torch": {v: {"time": statistics.median(
                                                a["step_s"] / b["step_s"] for a, b in zip(runs[v], runs["torch"])),
                                            "peak_extra_memory": results[v]["peak_extra_mib"]
                                            / max(ref["peak_extra_mib"], 1e-9)} for v in VARIANTS}}
    print(f"train step, tiny Llama H={args.hidden} L={args.layers} V={args.vocab}, {args.rows} rows x "
          f"{args.max_len} tokens ({ref['loss_tokens']} loss tokens), {report['machine']}")
    print(f"{'variant':<10} {'step s':>8} {'peak extra MiB':>15} {'time ratio':>11} {'memory ratio':>13}")
    for v in VARIANTS:
        r, q = results[v], report["ratios_vs_plain_torch"][v]
        print(f"{v:<10} {r['step_s']:8.3f} {r['peak_extra_mib']:15.1f} {q['time']:11.3f} {q['peak_extra_memory']:13.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="measured steps per child (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=3, help="children per variant, interleaved")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        print(json.dumps(child(args)))
    else:
        parent(args)


if __name__ == "__main__":
    main()
