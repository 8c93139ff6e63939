"""The vocabulary-parallel fused loss (safeshape.parallel.vocab) on 2 gloo processes against one process on the same
inputs: every objective, loss, per-token values and gradients (hidden, weight), ignored rows and labels on either
shard; both entry points (a plain local shard + group + vocab_start, and a ColwiseParallel DTensor head); the
refusals. One spawn runs every case (each rank saves its results); the tests below compare them."""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safeshape import ops

N, H, V, WORLD = 13, 8, 11, 2
SPLIT = (0, 6, 11)  # the rows Shard(0) gives each of 2 ranks (torch.chunk: 6 and 5)
IGNORED = (2, 7, 12)
CASES = {  # name: (objective, params, dtype, chunk_rows)
    "logprob": ("logprob", [], torch.float32, 0),
    "sft": ("sft", [], torch.float32, 4),
    "dss_k2": ("dss_k2", [0.5], torch.float32, 5),
    "deep_token": ("deep_token", [2.0, 1.0, 0.5], torch.float32, 0),
    "dss_k2_f64": ("dss_k2", [0.5], torch.float64, 3),
    "deep_token_f64": ("deep_token", [2.0, 1.0, 0.5], torch.float64, 0),
    "dss_k2_bf16": ("dss_k2", [0.5], torch.bfloat16, 4),  # with fp32_grad_weight, as in ops
    "dss_k2_clamp": ("dss_k2", [0.5, 7.0], torch.float32, 5),  # the KL clamp: k2 > 7 on 5 of the 10 tokens
}


def make_inputs(dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0], labels[1], labels[3] = 0, V - 1, SPLIT[1]  # both shards' edges
    labels[list(IGNORED)] = -100
    return dict(hidden=torch.randn(N, H, generator=g).to(dtype), weight=(torch.randn(V, H, generator=g) / 2).to(dtype),
                labels=labels, weights=torch.rand(N, generator=g).to(dtype),
                ref_logprobs=(-3 * torch.rand(N, generator=g)).to(dtype),
                positions=torch.randint(1, 5, (N,), generator=g))


def per_token_kwargs(x: dict, objective: str) -> dict:
    kw = dict(weights=x["weights"], ref_logprobs=x["ref_logprobs"], positions=x["positions"])
    if objective in ("logprob", "sft"):
        kw.pop("ref_logprobs")
        kw.pop("positions")
    return kw


def one_process(name: str) -> tuple:
    """(total, per_token, logprobs, grad_hidden, grad_weight) of the one-process fused loss."""
    objective, params, dtype, chunk_rows = CASES[name]
    x = make_inputs(dtype)
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    total, per, lp = ops.fused_linear_token_loss_sum(h, w, x["labels"], objective, params, chunk_rows=chunk_rows,
                                                     fp32_grad_weight=dtype == torch.bfloat16,
                                                     **per_token_kwargs(x, objective))
    total.backward()
    return total.detach(), per, lp, h.grad, w.grad


# ---- the 2-process run -------------------------------------------------------------------------------------------

def _catch(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return str(e)
    return ""


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from safeshape.loss import DSSLoss
    from safeshape.parallel.vocab import tp_vocab_shard, vocab_parallel_fused_linear_token_loss_sum as vp

    start, stop = SPLIT[rank], SPLIT[rank + 1]
    out: dict = {}
    for name, (objective, params, dtype, chunk_rows) in CASES.items():
        x = make_inputs(dtype)
        h = x["hidden"].clone().requires_grad_()
        w = x["weight"][start:stop].clone().requires_grad_()
        total, per, lp = vp(h, w, x["labels"], objective, params, group=None, vocab_start=start,
                            chunk_rows=chunk_rows, fp32_grad_weight=dtype == torch.bfloat16,
                            **per_token_kwargs(x, objective))
        total.backward()
        out[name] = (total.detach(), per, lp, h.grad, w.grad)

    objective, params = "dss_k2", [0.5]
    x = make_inputs()
    kw = per_token_kwargs(x, objective)
    w_local = x["weight"][start:stop]

    # the DTensor entry point: ColwiseParallel(output_layouts=Shard(-1)) on the head, as Megatron/torchtitan shard it
    mesh = init_device_mesh("cpu", (WORLD,))
    model = nn.Module()
    model.lm_head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(x["weight"])
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1))})
    shard = tp_vocab_shard(model.lm_head.weight)
    h = x["hidden"].clone().requires_grad_()
    total, _, _ = vp(h, model.lm_head.weight, x["labels"], objective, params, **kw)
    total.backward()
    h_dt = x["hidden"].clone().requires_grad_()  # hidden states that are themselves a (replicated) DTensor
    vp(DTensor.from_local(h_dt, mesh, [Replicate()]), model.lm_head.weight, x["labels"], objective, params,
       **kw)[0].backward()
    out["dtensor"] = dict(vocab_start=shard[2], local_rows=shard[0].shape[0], group_size=dist.get_world_size(shard[1]),
                          total=total.detach(), grad_hidden=h.grad, grad_hidden_of_dtensor=h_dt.grad,
                          grad_weight=model.lm_head.weight.grad.full_tensor(),
                          grad_placements=str(model.lm_head.weight.grad.placements))

    # an FSDP2-sharded head has the same Shard(0) layout but is not tensor-parallel
    fsdp_head = nn.Linear(H, V, bias=False)
    fully_shard(fsdp_head, mesh=mesh)
    out["fsdp"] = dict(shard=tp_vocab_shard(fsdp_head.weight),
                       error=_catch(lambda: vp(x["hidden"], fsdp_head.weight, x["labels"], objective, params, **kw)))
    out["plain_tp"] = tp_vocab_shard(x["weight"])

    # failure 5 of issue 21: the local shard alone, with its labels, gives a per-rank loss and no error
    here = (x["labels"] >= start) & (x["labels"] < stop)
    out["naive_local"] = ops.fused_linear_token_loss_sum(x["hidden"], w_local, torch.where(here, x["labels"] - start,
                                                         -100), objective, params, **kw)[0]
    out["naive_local_global_labels"] = _catch(
        lambda: ops.fused_linear_token_loss_sum(x["hidden"], w_local, x["labels"], objective, params, **kw))

    # the hidden gradient left partial for a caller that reduces it
    h = x["hidden"].clone().requires_grad_()
    vp(h, w_local, x["labels"], objective, params, group=None, vocab_start=start, reduce_grad_hidden=False,
       **kw)[0].backward()
    out["partial_grad_hidden"] = h.grad

    # a second backward through the same graph recomputes (collectives included)
    h, w = x["hidden"].clone().requires_grad_(), w_local.clone().requires_grad_()
    total = vp(h, w, x["labels"], objective, params, vocab_start=start, **kw)[0]
    total.backward(retain_graph=True)
    total.backward()
    out["twice"] = (h.grad, w.grad)
    with torch.no_grad():
        out["no_grad"] = vp(x["hidden"], w_local, x["labels"], objective, params, vocab_start=start, **kw)[0]

    # DSSLoss-level: its mean is the sum over the valid tokens (num_items_in_batch=None)
    h, w = x["hidden"].clone().requires_grad_(), w_local.clone().requires_grad_()
    total = vp(h, w, x["labels"], objective, DSSLoss(kl_coef=0.5).params(), vocab_start=start, **kw)[0]
    loss = total / (x["labels"] != -100).sum().clamp_min(1)
    loss.backward()
    out["dss_mean"] = (loss.detach(), h.grad, w.grad)

    out["overlap"] = _catch(lambda: vp(x["hidden"], w_local, x["labels"], objective, params, vocab_start=0, **kw))
    bad = x["labels"].clone()
    bad[4] = V
    out["bad_label"] = _catch(lambda: vp(x["hidden"], w_local, bad, objective, params, vocab_start=start, **kw))
    out["no_start"] = _catch(lambda: vp(x["hidden"], w_local, x["labels"], objective, params, **kw))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process vocabulary-parallel run did not finish in 300 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a, b, dtype=torch.float32):
    tol = {torch.float64: 1e-10, torch.bfloat16: 2e-2}.get(dtype, 1e-5)  # bf16: its own rounding of l, lse
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_every_objective_matches_one_process(ranks, name):
    total, per, lp, gh, gw = one_process(name)
    dtype = CASES[name][2]
    for r, res in enumerate(ranks):
        r_total, r_per, r_lp, r_gh, r_gw = res[name]
        _close(r_total, total, dtype)
        _close(r_per, per, dtype)
        _close(r_lp, lp, dtype)
        _close(r_gh, gh, dtype)  # the whole hidden gradient on every rank (all-reduced in backward)
        _close(r_gw, gw[SPLIT[r]:SPLIT[r + 1]], dtype)  # each rank: its rows of the head's gradient
        assert (r_per[list(IGNORED)] == 0).all() and (r_lp[list(IGNORED)] == 0).all()


def test_labels_fall_on_both_shards_and_rows_are_ignored():
    labels = make_inputs()["labels"]
    valid = labels[labels != -100]
    assert ((valid < SPLIT[1]).any() and (valid >= SPLIT[1]).any()), "the cases must put labels on both shards"


def test_dtensor_head_matches_one_process(ranks):
    total, _, _, gh, gw = one_process("dss_k2")
    for r, res in enumerate(ranks):
        d = res["dtensor"]
        assert (d["vocab_start"], d["local_rows"], d["group_size"]) == (SPLIT[r], SPLIT[r + 1] - SPLIT[r], WORLD)
        _close(d["total"], total)
        _close(d["grad_hidden"], gh)
        _close(d["grad_weight"], 2 * gw)  # accumulated over the two calls; the DTensor gradient, gathered to compare
        _close(d["grad_hidden_of_dtensor"], gh)
        assert "Shard(dim=0)" in d["grad_placements"]


def test_fsdp_sharded_head_is_not_taken_for_tensor_parallel(ranks):
    for res in ranks:
        assert res["fsdp"]["shard"] is None
        assert "not managed by FSDP" in res["fsdp"]["error"]
        assert res["plain_tp"] is None


def test_failure5_local_shard_with_its_labels(ranks):
    """Issue 21, failure 5: a rank's shard alone with its labels gives a per-shard loss without an error (or, with
    the global ids, refuses); the vocabulary-parallel loss gives the unsharded loss on every rank."""
    total = one_process("dss_k2")[0]
    naive = [res["naive_local"] for res in ranks]
    assert all(not torch.allclose(n, total, atol=1e-3) for n in naive), (naive, total)
    assert "outside [0, 5)" in ranks[1]["naive_local_global_labels"]
    for res in ranks:
        _close(res["dss_k2"][0], total)


def test_partial_hidden_gradient_sums_to_the_whole(ranks):
    gh = one_process("dss_k2")[3]
    partial = [res["partial_grad_hidden"] for res in ranks]
    assert not torch.allclose(partial[0], gh, atol=1e-3)
    _close(partial[0] + partial[1], gh)


def test_second_backward_and_no_grad(ranks):
    total, _, _, gh, gw = one_process("dss_k2")
    for r, res in enumerate(ranks):
        _close(res["twice"][0], 2 * gh)
        _close(res["twice"][1], 2 * gw[SPLIT[r]:SPLIT[r + 1]])
        _close(res["no_grad"], total)


def test_dss_loss_level_mean(ranks):
    """What DSSLoss computes (its mean over the valid tokens, and its gradients) with the head sharded."""
    from safeshape.loss import DSSLoss

    x = make_inputs()
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    out = DSSLoss(kl_coef=0.5)(labels=x["labels"], weights=x["weights"], ref_logprobs=x["ref_logprobs"], hidden=h,
                               lm_head_weight=w)
    out.loss.backward()
    for r, res in enumerate(ranks):
        loss, r_gh, r_gw = res["dss_mean"]
        _close(loss, out.loss.detach())
        _close(r_gh, h.grad)
        _close(r_gw, w.grad[SPLIT[r]:SPLIT[r + 1]])


def test_refusals(ranks):
    for res in ranks:
        assert "tile [0, V)" in res["overlap"]
        assert f"labels[4] = {V} is outside [0, {V})" in res["bad_label"]
        assert "needs vocab_start" in res["no_start"]
