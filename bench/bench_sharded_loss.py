"""The fused token loss with the lm head sharded over 2 ranks by FSDP2 (rows of the vocabulary): gather-then-fused
against the vocabulary-parallel loss (safeshape.parallel.vocab), peak extra memory per rank and time of one
forward + backward, printed as ratios measured in one run. Targets (issue 21): per-rank peak <= 0.6x, time <= 1.2x.

Both start from the same FSDP2 state: ``fully_shard(lm_head)`` on a 2-rank CPU mesh (gloo), the weight a
``Shard(0)`` DTensor of ``[V / 2, H]`` per rank, each rank with its own ``N`` tokens (data parallel), and end with
the same gradients (the head's shard, reduced over both ranks' tokens, and each rank's hidden states'):

    gather_fused    w = lm_head.weight.full_tensor(grad_placements=[Partial()])   (all-gather V x H)
                    ops.fused_linear_token_loss_sum(hidden, w, ...)  on the rank's N tokens, full vocabulary
                    backward: the V x H gradient reduce-scattered to the shard
    vocab_parallel  hidden of both ranks all-gathered (2N x H; its backward reduce-scatters the hidden gradient)
                    vocab_parallel_fused_linear_token_loss_sum on 2N tokens x the rank's V / 2 rows, never
                    gathering the head: per chunk one all-gather of [3, rows] statistics

The two do the same GEMM work per rank (N x V x H = 2N x V/2 x H). Each (implementation, round) runs in its own
``torchrun --nproc_per_node=2`` so that each rank's peak RSS (ru_maxrss) is its own; peak extra = peak RSS - RSS
once the sharded head and the inputs exist; one thread per rank. The head is created on the meta device and only
its shard is materialised (a full head built first would set the peak).

    python bench/bench_sharded_loss.py                               # 1024 tokens/rank x 1024 x 128256, dss_k2
    python bench/bench_sharded_loss.py --rows 256 --vocab 32000 --rounds 1
Writes JSON to bench/out/sharded_loss_cpu.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["gather_fused", "vocab_parallel"]
OBJECTIVES = {"dss_k2": [0.5], "deep_token": [0.5, 2.0, 2.0, 2.0, 2.0, 0.1], "sft": [], "logprob": []}
MARK = "BENCH_SHARDED_LOSS_RESULT "


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rank_inputs(rank: int, n: int, v: int, hidden: int, torch):
    """The rank's own tokens: hidden [n, H], labels (1/8 ignored), STAR-like weights, reference logprobs,
    positions."""
    g = torch.Generator().manual_seed(1000 + rank)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[: n // 8] = -100
    return dict(hidden=torch.randn(n, hidden, generator=g), labels=labels, weights=torch.rand(n, generator=g),
                ref_logprobs=-8 * torch.rand(n, generator=g), positions=torch.arange(n) % 128 + 1)


def child(impl: str, n: int, hidden: int, v: int, objective: str, repeats: int) -> None:
    """One rank of one implementation (under torchrun): time and peak extra memory of forward + backward."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Shard

    from safeshape import ops
    from safeshape.parallel.vocab import vocab_parallel_fused_linear_token_loss_sum

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        head = nn.Linear(hidden, v, bias=False)
    fully_shard(head, mesh=mesh)
    head.to_empty(device="cpu")
    local = head.weight.to_local()
    with torch.no_grad():  # the same head for both implementations, made shard by shard
        local.copy_(torch.randn(local.shape, generator=torch.Generator().manual_seed(rank)) / hidden ** 0.5)
    x = rank_inputs(rank, n, v, hidden, torch)
    h = x["hidden"].requires_grad_()
    params = OBJECTIVES[objective]
    keys = ("labels", "weights", "ref_logprobs", "positions")

    def gather_fused():
        w = head.weight.full_tensor(grad_placements=[Partial()])
        total, _, _ = ops.fused_linear_token_loss_sum(h, w, x["labels"], objective, params,
                                                      **{k: x[k] for k in keys[1:]})
        total.backward()
        return total.detach()

    def vocab_parallel():
        h_all = DTensor.from_local(h, mesh, [Shard(0)]).full_tensor(grad_placements=[Partial()])
        rows = {}
        for k in keys:  # every rank's per-token inputs, [2N] (no gradient)
            parts = [torch.empty_like(x[k]) for _ in range(world)]
            dist.all_gather(parts, x[k])
            rows[k] = torch.cat(parts)
        total, _, _ = vocab_parallel_fused_linear_token_loss_sum(
            h_all, head.weight.to_local(), rows["labels"], objective, params, group=mesh.get_group(),
            vocab_start=rank * -(-v // world), reduce_grad_hidden=False, **{k: rows[k] for k in keys[1:]})
        total.backward()
        return total.detach() / world  # the global sum, on every rank: this rank's share of it

    step = {"gather_fused": gather_fused, "vocab_parallel": vocab_parallel}[impl]
    import gc
    gc.collect()
    base = rss_bytes()
    times = []
    for i in range(repeats + 1):  # the first run (page faults, gloo buffers) is not timed
        head.weight.grad, h.grad = None, None
        dist.barrier()
        t0 = time.perf_counter()
        total = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    total_sum = total.clone()
    dist.all_reduce(total_sum)
    mine = dict(rank=rank, times_s=times[1:], peak_extra_bytes=int(peak),
                grad_weight_sum=float(head.weight.grad.to_local().double().sum()),
                grad_weight_abs=float(head.weight.grad.to_local().double().abs().sum()),
                grad_hidden_sum=float(h.grad.double().sum()), loss_total=float(total_sum))
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print(MARK + json.dumps(dict(impl=impl, ranks=everyone)), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(impl: str, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).resolve()), "--child", impl, "--rows", str(args.rows),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--objective", args.objective,
           "--repeats", str(args.repeats)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'python'}{os.pathsep}"
               f"{os.environ.get('PYTHONPATH', '')}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, error=f"timed out after {args.timeout} s")
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return dict(impl=impl, error=f"exit {r.returncode}: {(r.stdout + r.stderr)[-2000:]}")


def machine(torch) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
                platform=platform.platform())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        info["loadavg_start"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    return info


def summarise(runs: dict) -> list[dict]:
    """Per implementation: min time (the slowest rank of a run) and max peak (the largest rank), over rounds."""
    out = []
    for impl, rs in runs.items():
        bad = [r for r in rs if "error" in r]
        if bad:
            out.append(bad[0])
            continue
        times = [max(min(k["times_s"]) for k in r["ranks"]) for r in rs]
        ranks = rs[0]["ranks"]
        out.append(dict(impl=impl, time_s=min(times), times_s=times,
                        peak_extra_bytes=max(k["peak_extra_bytes"] for r in rs for k in r["ranks"]),
                        peak_extra_bytes_per_rank=[max(r["ranks"][i]["peak_extra_bytes"] for r in rs)
                                                   for i in range(len(ranks))],
                        loss_total=ranks[0]["loss_total"],
                        grad_weight_sum=[k["grad_weight_sum"] for k in ranks],
                        grad_weight_abs=[k["grad_weight_abs"] for k in ranks],
                        grad_hidden_sum=[k["grad_hidden_sum"] for k in ranks]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024, help="tokens per rank (N)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--objective", default="dss_k2", choices=list(OBJECTIVES))
    ap.add_argument("--repeats", type=int, default=1, help="timed runs inside each torchrun (after one untimed)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds; each runs both implementations, interleaved (min time, max peak reported)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per (implementation, round)")
    ap.add_argument("--json", default=None, help="where to write the JSON results "
                                                 "(default bench/out/sharded_loss_cpu.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.rows, args.hidden, args.vocab, args.objective, args.repeats)
        return 0

    import torch

    jobs = [i for _ in range(args.rounds) for i in IMPLS]
    try:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="bench_sharded_loss", file=sys.stderr)
    except ImportError:
        pass
    info = machine(torch)
    runs: dict = {}
    for impl in jobs:
        runs.setdefault(impl, []).append(run_child(impl, args))
    results = summarise(runs)
    by = {r["impl"]: r for r in results}
    gib = 1 << 30
    shape = f"{args.rows} tokens/rank x H {args.hidden} x V {args.vocab}"
    print(f"\nFused {args.objective} loss fwd+bwd, head sharded over 2 ranks (FSDP2, gloo, CPU, float32, 1 thread a "
          f"rank), {shape}; min time over {args.rounds} rounds x {args.repeats} runs, max peak over ranks")
    print(f"{'impl':>15} {'time s':>9} {'x gather':>9} {'peak GiB/rank':>14} {'x gather':>9}")
    base = by.get("gather_fused")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:>15} error: {r['error']}")
            continue
        ok = base is not None and "error" not in base
        r["time_ratio"] = r["time_s"] / base["time_s"] if ok else None
        r["peak_ratio"] = r["peak_extra_bytes"] / base["peak_extra_bytes"] if ok else None
        tr = f"{r['time_ratio']:.3f}" if ok else "-"
        mr = f"{r['peak_ratio']:.3f}" if ok else "-"
        print(f"{r['impl']:>15} {r['time_s']:9.3f} {tr:>9} {r['peak_extra_bytes'] / gib:14.3f} {mr:>9}")
    vp = by.get("vocab_parallel")
    if base and vp and "error" not in base and "error" not in vp:
        agree = dict(loss_rel=abs(vp["loss_total"] - base["loss_total"]) / max(abs(base["loss_total"]), 1e-30),
                     grad_weight_rel=max(abs(a - b) / max(c, 1e-30) for a, b, c in
                                         zip(vp["grad_weight_sum"], base["grad_weight_sum"], base["grad_weight_abs"])),
                     grad_hidden_abs=max(abs(a - b) for a, b in zip(vp["grad_hidden_sum"], base["grad_hidden_sum"])))
        print(f"same results: loss total rel. diff {agree['loss_rel']:.2e}, head-gradient sums rel. diff "
              f"{agree['grad_weight_rel']:.2e}, hidden-gradient sums abs. diff {agree['grad_hidden_abs']:.2e}")
        print(f"targets: peak <= 0.6x ({'met' if vp['peak_ratio'] <= 0.6 else 'NOT met'}), "
              f"time <= 1.2x ({'met' if vp['time_ratio'] <= 1.2 else 'NOT met'})")
    else:
        agree = None
    info["loadavg_end"] = os.getloadavg()
    report = dict(bench="sharded_loss", shape=dict(rows_per_rank=args.rows, hidden=args.hidden, vocab=args.vocab),
                  objective=args.objective, dtype="float32", world=2, rounds=args.rounds, repeats=args.repeats,
                  machine=info, results=results, agreement=agree)
    out = Path(args.json) if args.json else ROOT / "bench" / "out" / "sharded_loss_cpu.json"
    sys.path.insert(0, str(ROOT / "python"))
    from safeshape.io import write_json
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report, overwrite=True)
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
