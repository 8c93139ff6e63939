"""Token losses (DSS k2, Deep Token, SFT), forward + backward of a mean loss over [N] tokens: ours (unfused, fused)
against the plain-torch reference, time and peak extra memory, printed as ratios measured in one run.

Objectives (--objectives): dss_k2 (kl_coef 0.5, STAR-like weights), deep_token (betas 0.5, 2 x4, 0.1; positions in
rows of 128 tokens), sft. Implementations (every one ends with d(loss)/d(hidden) and d(loss)/d(lm_head weight), or
d/d(logits) for the "rows" pair, which leaves the lm-head GEMMs out and measures the row kernels alone):
    reference      logits = h @ W^T, reference.token_logprobs (log_softmax + gather) + reference.token_objective,
                   autograd
    unfused        logits = h @ W^T, ops.token_logprobs (native row kernels) + ops.token_objective, autograd
    fused          ops.fused_linear_token_loss, per-token output (backward recomputes the chunk logits: 4 GEMMs)
    fused_sum      ops.fused_linear_token_loss_sum, what DSSLoss / DeepTokenLoss (fused=True) run (gradients in
                   the forward: 3 GEMMs)
    liger_flce     Liger-Kernel's fused linear cross-entropy (CUDA, if installed; cross-entropy only, no weights/KL)
    rows_reference / rows_ours   the loss on given logits [N, V] (no GEMM)

Each (case, implementation) runs in its own subprocess on CPU so that its peak RSS (ru_maxrss) is its own; peak
extra memory = peak RSS - RSS after the inputs were made. On CUDA: torch.cuda.max_memory_allocated - allocated
after the inputs. "transient" subtracts the gradients every implementation must return.

    python bench/bench_dss_loss.py                      # CPU sizes that fit these 2-core / 24 GiB machines
    python bench/bench_dss_loss.py --device cuda        # the issue's sizes on a GPU (bf16), Liger if installed
    python bench/bench_dss_loss.py --cases 4096x2048x32000 --impls reference,fused_sum --objectives deep_token
Writes JSON to bench/out/dss_loss_<device>.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["reference", "unfused", "fused", "fused_sum", "rows_reference", "rows_ours"]
OBJECTIVES = {"dss_k2": [0.5], "deep_token": [0.5, 2.0, 2.0, 2.0, 2.0, 0.1], "sft": []}
CPU_CASES = ["2048x1024x32000", "2048x1024x128256", "4096x2048x32000"]
CUDA_CASES = ["4096x2048x32000", "4096x2048x128256", "8192x2048x32000", "8192x2048x128256"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(n, h, v, dtype, device, torch):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[: n // 8] = -100
    weights = torch.rand(n, generator=g).to(device)
    ref = (-torch.rand(n, generator=g) * 8).to(device)
    positions = (torch.arange(n) % 128 + 1).to(device)
    return hidden, weight, labels, weights, ref, positions


def step_fn(impl, inputs, torch, frozen_lm_head=False, objective="dss_k2"):
    """A closure running one forward + backward; returns the gradients it produced."""
    from safeshape import ops, reference

    hidden, weight, labels, weights, ref, positions = inputs
    n_valid = int((labels != -100).sum())
    params = OBJECTIVES[objective]
    kw = {"dss_k2": dict(weights=weights, ref_logprobs=ref), "deep_token": dict(ref_logprobs=ref, positions=positions),
          "sft": dict(weights=weights)}[objective]

    def per_token(lib, logits):
        return lib.token_objective(lib.token_logprobs(logits, labels), labels, objective, params, **kw)

    if impl in ("rows_reference", "rows_ours"):
        with torch.no_grad():
            logits0 = hidden @ weight.T

        def rows():
            z = logits0.detach().requires_grad_()
            (per_token(reference if impl == "rows_reference" else ops, z).sum() / n_valid).backward()
            return [z.grad]
        return rows, logits0

    def run():
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_(not frozen_lm_head)
        if impl == "reference":
            loss = per_token(reference, h @ w.T).sum() / n_valid
        elif impl == "unfused":
            loss = per_token(ops, h @ w.T).sum() / n_valid
        elif impl == "fused":
            loss = ops.fused_linear_token_loss(h, w, labels, objective, params, **kw)[0].sum() / n_valid
        elif impl == "fused_sum":
            loss = ops.fused_linear_token_loss_sum(h, w, labels, objective, params, **kw)[0] / n_valid
        elif impl == "liger_flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)(w, h, labels)
        else:
            raise SystemExit(f"bench_dss_loss: unknown implementation {impl!r}")
        loss.backward()
        return [h.grad] if frozen_lm_head else [h.grad, w.grad]
    return run, None


def measure(impl, case, dtype_name, device, repeats, frozen_lm_head=False, objective="dss_k2") -> dict:
    """Runs in the child process: time (min over repeats) and peak extra memory of one implementation."""
    import torch

    import safeshape  # noqa: F401

    n, h, v = (int(x) for x in case.split("x"))
    dtype = getattr(torch, dtype_name)
    # warm up on small inputs: library initialisation (BLAS, thread pool, CUDA context) is not what is measured
    step_fn(impl, make_inputs(64, 64, 512, dtype, device, torch), torch, frozen_lm_head, objective)[0]()
    inputs = make_inputs(n, h, v, dtype, device, torch)
    fn, _ = step_fn(impl, inputs, torch, frozen_lm_head, objective)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        grads = fn()
        sync()
        times.append(time.perf_counter() - t0)
        out_bytes = sum(g.numel() * g.element_size() for g in grads)
        del grads
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"impl": impl, "case": case, "objective": objective, "dtype": dtype_name, "device": device,
            "time_s": min(times),
            "times_s": times, "peak_extra_bytes": int(peak), "grad_bytes": int(out_bytes),
            "transient_bytes": int(peak - out_bytes), "frozen_lm_head": frozen_lm_head}


def run_child(impl, case, objective, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--cases", case, "--dtype", args.dtype, "--device", args.device,
           "--repeats", str(args.repeats), "--objectives", objective] + (
        ["--frozen-lm-head"] if args.frozen_lm_head else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0:
        return {"impl": impl, "case": case, "objective": objective,
                "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine(device) -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default=None, help="comma-separated NxHxV (default: per device)")
    ap.add_argument("--impls", default=None, help=f"comma-separated, from {IMPLS + ['liger_flce']}")
    ap.add_argument("--objectives", default="dss_k2,deep_token", help=f"comma-separated, from {list(OBJECTIVES)}")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs inside each subprocess (CPU 1, CUDA 5)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds; each round runs every implementation once, interleaved so that load from other "
                         "processes spreads over all of them (CPU 3, CUDA 1); min time and max peak are reported")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per (case, implementation)")
    ap.add_argument("--json", default=None, help="where to write the JSON results")
    ap.add_argument("--frozen-lm-head", action="store_true",
                    help="the lm-head weight does not require grad (LoRA): only d/d(hidden) is formed")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (5 if cuda else 1)
    args.rounds = args.rounds or (1 if cuda else 3)
    cases = (args.cases or ",".join(CUDA_CASES if cuda else CPU_CASES)).split(",")
    objectives = args.objectives.split(",")
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise SystemExit(f"bench_dss_loss: unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")

    if args.child:
        print(json.dumps(measure(args.child, cases[0], args.dtype, args.device, args.repeats, args.frozen_lm_head,
                                 objectives[0])))
        return 0

    impls = (args.impls or ",".join(IMPLS)).split(",")
    if cuda and args.impls is None:
        try:
            import liger_kernel  # noqa: F401
            impls.append("liger_flce")
        except ImportError:
            print("liger_kernel is not installed: no Liger comparison")
    jobs = [(c, o, r, i) for c in cases for o in objectives for r in range(args.rounds) for i in impls
            if not (i == "liger_flce" and o != objectives[0])]
    try:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="bench_dss_loss", file=sys.stderr)
    except ImportError:
        pass
    runs: dict = {}
    for case, objective, _, impl in jobs:
        runs.setdefault((case, objective, impl), []).append(run_child(impl, case, objective, args))
    results = []
    for (case, objective, impl), rs in runs.items():
        bad = [r for r in rs if "error" in r]
        if bad:
            results.append(bad[0])
            continue
        best = dict(min(rs, key=lambda r: r["time_s"]))
        best["times_s"] = [t for r in rs for t in r["times_s"]]
        for k in ("peak_extra_bytes", "transient_bytes"):
            best[k] = max(r[k] for r in rs)
        results.append(best)

    gib = 1 << 30
    print(f"\nToken losses fwd+bwd, {args.device}, {args.dtype}, min over {args.rounds} interleaved rounds x "
          f"{args.repeats} runs"
          f"{', frozen lm_head' if args.frozen_lm_head else ''}; ratios are ours / reference (time, memory)")
    print(f"{'case NxHxV':>18} {'objective':>10} {'impl':>15} {'time s':>9} {'x ref':>7} {'peak GiB':>9} {'x ref':>7} "
          f"{'transient GiB':>14} {'x ref':>7}")
    for case, objective in [(c, o) for c in cases for o in objectives]:
        rows = {r["impl"]: r for r in results if r["case"] == case and r["objective"] == objective}
        for impl in impls:
            r = rows.get(impl)
            if impl == "liger_flce" and r is None:
                continue
            if r is None or "error" in r:
                print(f"{case:>18} {objective:>10} {impl:>15}  failed: {r and r.get('error')}")
                continue
            base = rows.get("rows_reference" if impl.startswith("rows_") else "reference")
            ok = base is not None and "error" not in base
            tr = f"{r['time_s'] / base['time_s']:.2f}" if ok else "-"
            mr = (f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.3f}"
                  if ok and base["peak_extra_bytes"] > 0 else "-")
            xr = (f"{r['transient_bytes'] / base['transient_bytes']:.3f}"
                  if ok and base["transient_bytes"] > 0 else "-")
            if ok:
                r["time_ratio"], r["peak_ratio"] = float(tr), (float(mr) if mr != "-" else None)
                r["transient_ratio"] = float(xr) if xr != "-" else None
            print(f"{case:>18} {objective:>10} {impl:>15} {r['time_s']:9.3f} {tr:>7} "
                  f"{r['peak_extra_bytes'] / gib:9.3f} {mr:>7} {r['transient_bytes'] / gib:14.3f} {xr:>7}")
    out = Path(args.json) if args.json else ROOT / "bench" / "out" / f"dss_loss_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine(args.device), "dtype": args.dtype, "repeats": args.repeats,
                               "rounds": args.rounds,
                               "frozen_lm_head": args.frozen_lm_head, "results": results}, indent=2))
    tmp.replace(out)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
