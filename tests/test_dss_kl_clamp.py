"""The DSS KL clamp (docs/math.md#dss-kl-clamp): objective dss_k2 with params [kl_coef, kl_clamp] bounds the k2
estimate as OpenRLHF's compute_approx_kl does since its July 2025 change, ``clamp(0.5 (l - l_ref)^2, -C, C)``, with
torch's clamp gradient (pass-through inside [-C, C], its ends included; 0 outside). Native vs the plain-torch reference
with the clamp active on a good share of tokens (unfused, fused, fused sum; several shapes and dtypes; CPU kernels and
the CUDA kernels under emulation), gradcheck, opcheck, the boundary, the refusals, DSSLoss, hf and the train flag."""
import math

import pytest
import torch

from safeshape import ops, reference
from safeshape.errors import SafeshapeError
from safeshape.loss import DSSLoss
from tests.conftest import DEVICES

IGNORE = -100
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # half dtypes: 1e-2 (their logits are rounded)
CLAMP = 1.0  # k2 > 1 where |l - l_ref| > sqrt(2)


def rel(got, want):
    got, want = got.double(), want.double()
    den = want.norm()
    return ((got - want).norm() / den).item() if den > 0 else got.norm().item()


def clamped_share(lp, ref, labels, clamp=CLAMP):
    valid = labels != IGNORE
    k2 = 0.5 * (lp.double() - ref.double()) ** 2
    return float((k2[valid] > clamp).double().mean())


def offsets(n, g, clamp=CLAMP):
    """l - l_ref offsets: about half beyond sqrt(2 clamp) (either sign), none within 0.05 of it (so a rounding of
    l in a low precision cannot move a token across the boundary)."""
    edge = math.sqrt(2 * clamp)
    mag = torch.rand(n, generator=g, dtype=torch.float64) * 2 * edge
    mag = torch.where((mag - edge).abs() < 0.05, mag + 0.1, mag)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return sign * mag


def make_case(n, v, dtype, device, seed=0):
    """logits [n, v], labels, weights, ref_logprobs = l + offset, a non-uniform upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 3:
        labels[torch.randperm(n, generator=g)[: n // 5]] = IGNORE
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights[::4] = 0.0
    lp = reference.token_logprobs(logits.double(), labels)
    ref = lp - offsets(n, g)
    grad = torch.randn(n, generator=g, dtype=torch.float64) * 3.0
    st = torch.float64 if dtype == torch.float64 else torch.float32
    return logits.to(device), labels.to(device), weights.to(st).to(device), ref.to(st).to(device), grad.to(device)


def value_and_grads(fn, leaves, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    (out * grad_out.to(out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(9, 13), (40, 1000), (64, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unfused_clamp_matches_reference(shape, dtype, device):
    logits, labels, weights, ref, g = make_case(*shape, dtype, device)
    kw = dict(weights=weights, ref_logprobs=ref)
    params = [0.7, CLAMP]
    assert 0.25 <= clamped_share(reference.token_logprobs(logits.double(), labels), ref, labels) <= 0.75
    got, (gz,) = value_and_grads(
        lambda z: ops.token_objective(ops.token_logprobs(z, labels), labels, "dss_k2", params, **kw), [logits], g)
    kw64 = {k: v.double() for k, v in kw.items()}
    want, (wz,) = value_and_grads(
        lambda z: reference.token_objective(reference.token_logprobs(z, labels), labels, "dss_k2", params, **kw64),
        [logits.double()], g)
    tol = TOL.get(dtype, 1e-2)
    assert rel(got, want) <= tol and rel(gz, wz) <= tol
    assert (got[labels == IGNORE] == 0).all() and (gz[labels == IGNORE] == 0).all()
    # the clamp changed something: the unclamped loss differs
    plain = ops.token_objective(ops.token_logprobs(logits, labels), labels, "dss_k2", [0.7], **kw)
    assert rel(plain, got) > 1e-2


def make_fused(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[: n // 5]] = IGNORE
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    weights[1::4] = 0.0
    lp = reference.fused_linear_token_logprobs(hidden.double(), weight.double(), labels)
    ref = lp - offsets(n, g)
    grad = torch.randn(n, generator=g, dtype=torch.float64) * 3.0
    st = torch.float64 if dtype == torch.float64 else torch.float32
    return [t.to(device) for t in (hidden, weight, labels, weights.to(st), ref.to(st), grad)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_rows", [0, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_clamp_matches_reference(chunk_rows, dtype, device):
    hidden, weight, labels, weights, ref, g = make_fused(37, 24, 301, dtype, device)
    kw = dict(weights=weights, ref_logprobs=ref)
    params = [0.5, CLAMP]
    assert 0.25 <= clamped_share(reference.fused_linear_token_logprobs(hidden.double(), weight.double(), labels),
                                 ref, labels) <= 0.75
    got, (gh, gW) = value_and_grads(
        lambda h, W: ops.fused_linear_token_loss(h, W, labels, "dss_k2", params, chunk_rows=chunk_rows, **kw)[0],
        [hidden, weight], g)
    kw64 = {k: v.double() for k, v in kw.items()}
    want, (wh, wW) = value_and_grads(
        lambda h, W: reference.fused_linear_token_loss(h, W, labels, "dss_k2", params, **kw64),
        [hidden.double(), weight.double()], g)
    tol = TOL.get(dtype, 1e-2)
    assert rel(got, want) <= tol and rel(gh, wh) <= tol and rel(gW, wW) <= tol
    # the summed loss that forms its gradients in the forward
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, per_token, _ = ops.fused_linear_token_loss_sum(h1, w1, labels, "dss_k2", params, chunk_rows=chunk_rows,
                                                          **kw)
    (total * 1.5).backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (reference.fused_linear_token_loss(h2, w2, labels, "dss_k2", params, **kw64).sum() * 1.5).backward()
    assert rel(per_token, want) <= tol and rel(h1.grad, h2.grad) <= tol and rel(w1.grad, w2.grad) <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_clamp_gradient_is_torch_clamp_at_and_around_the_bound(device):
    # l - l_ref = +-2 gives k2 = 2 exactly: with C = 2 the token sits on the bound. torch 2.14's scalar clamp gives
    # the gradient 0 there (the minimum-norm subgradient; torch up to 2.12 gave 1: pytorch/pytorch#184574), and so do
    # the op and the reference; just beyond: 0, just inside: the unclamped gradient. Every value exact in float32.
    lp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0], device=device)
    ref = torch.tensor([-3.0, 1.0, -3.25, -2.75, -0.5, 0.5], device=device)  # d = 2, -2, 2.25, 1.75, -0.5, -1.5
    w = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.0, 1.0], device=device)
    labels = torch.zeros(6, dtype=torch.long, device=device)
    params = [0.5, 2.0]
    x = lp.clone().requires_grad_()
    ops.token_objective(x, labels, "dss_k2", params, weights=w, ref_logprobs=ref).sum().backward()
    inside = lambda d, w: -w + 0.5 * (1 - w) * d  # noqa: E731
    want = torch.tensor([0.0, -0.25, 0.0, inside(1.75, 0.5), inside(-0.5, 0.0), -1.0], device=device)
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    y = lp.clone().requires_grad_()
    k2 = (0.5 * (y - ref) ** 2).clamp(min=-2.0, max=2.0)  # OpenRLHF's clamp of the estimate, autograd's gradient
    (w * -y + 0.5 * (1 - w) * k2).sum().backward()
    torch.testing.assert_close(y.grad, want, rtol=0, atol=0,
                               msg=f"torch {torch.__version__}'s scalar clamp changed its gradient on the bound")
    z = lp.clone().requires_grad_()
    reference.token_objective(z, labels, "dss_k2", params, weights=w, ref_logprobs=ref).sum().backward()
    torch.testing.assert_close(z.grad, want, rtol=0, atol=0)
    value = ops.token_objective(lp, labels, "dss_k2", params, weights=w, ref_logprobs=ref)
    assert value[0] == 0.5 * 2.0 and value[2] == 0.5 * 2.0  # on the bound and beyond: lambda (1 - w) C


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64_with_clamp(device):
    logits, labels, weights, ref, _ = make_case(8, 9, torch.float64, device, seed=3)
    params = [0.5, CLAMP]
    kw = dict(weights=weights, ref_logprobs=ref)
    z = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: ops.token_objective(ops.token_logprobs(z, labels), labels, "dss_k2", params, **kw), (z,))
    hidden, weight, flabels, fw, fr, _ = make_fused(10, 5, 11, torch.float64, device, seed=4)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fkw = dict(weights=fw, ref_logprobs=fr)
    assert torch.autograd.gradcheck(
        lambda h, W: ops.fused_linear_token_loss(h, W, flabels, "dss_k2", params, chunk_rows=3, **fkw), (h, W))
    assert torch.autograd.gradcheck(
        lambda h, W: ops.fused_linear_token_loss_sum(h, W, flabels, "dss_k2", params, chunk_rows=4, **fkw)[0], (h, W))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_with_clamp(dtype, device):
    sop = torch.ops.safeshape
    logits, labels, weights, ref, _ = make_case(9, 17, dtype, device, seed=5)
    lp, _ = sop.token_logprobs(logits, labels, IGNORE)
    torch.library.opcheck(sop.token_objective.default,
                          (lp.clone().requires_grad_(), labels, weights, ref, None, "dss_k2", [0.5, CLAMP], IGNORE))
    hidden, weight, flabels, fw, fr, _ = make_fused(9, 6, 17, dtype, device, seed=6)
    h = hidden.clone().requires_grad_()
    for grad, grad_weight in ((False, False), (True, True)):
        torch.library.opcheck(sop.fused_linear_token_loss.default,
                              (h, weight, flabels, fw, fr, None, "dss_k2", [0.5, CLAMP], IGNORE, 4, grad, grad_weight,
                               False))


def test_clamp_params_are_checked():
    logits, labels, weights, ref, _ = make_case(5, 7, torch.float32, "cpu")
    lp = ops.token_logprobs(logits, labels)
    for params in ([0.5, 0.0], [0.5, -1.0], [0.5, math.nan], [0.5, math.inf], [0.5, 1.0, 2.0]):
        with pytest.raises(RuntimeError, match=r"dss_k2' takes params = \[kl_coef >= 0\] or \[kl_coef, kl_clamp > 0"):
            ops.token_objective(lp, labels, "dss_k2", params, weights=weights, ref_logprobs=ref)


def test_no_clamp_is_todays_loss_and_a_huge_clamp_changes_nothing():
    logits, labels, weights, ref, _ = make_case(40, 50, torch.float32, "cpu", seed=7)
    lp = ops.token_logprobs(logits, labels)
    kw = dict(weights=weights, ref_logprobs=ref)
    plain = ops.token_objective(lp, labels, "dss_k2", [0.5], **kw)
    d = lp - ref
    today = torch.where(labels != IGNORE, -weights * lp + 0.5 * (1 - weights) * 0.5 * d * d, 0.0)
    assert torch.equal(plain, today)  # the unclamped path is untouched (bit for bit)
    assert DSSLoss(0.5).params() == [0.5] and DSSLoss(0.5, kl_clamp=10).params() == [0.5, 10.0]
    torch.testing.assert_close(ops.token_objective(lp, labels, "dss_k2", [0.5, 1e30], **kw), plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_dss_loss_with_clamp(fused, device):
    hidden, weight, labels, weights, ref, _ = make_fused(30, 16, 97, torch.float32, device, seed=8)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_fn = DSSLoss(kl_coef=0.5, kl_clamp=CLAMP, fused=fused, chunk_rows=7)
    if fused:
        out = loss_fn(labels=labels, weights=weights, ref_logprobs=ref, hidden=h, lm_head_weight=W)
    else:
        out = loss_fn(labels=labels, weights=weights, ref_logprobs=ref, logits=h @ W.T)
    out.loss.backward()
    h2, W2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    per = reference.fused_linear_token_loss(h2, W2, labels, "dss_k2", [0.5, CLAMP], weights=weights.double(),
                                            ref_logprobs=ref.double())
    n = int((labels != IGNORE).sum())
    (per.sum() / n).backward()
    torch.testing.assert_close(out.loss.double(), per.sum().detach() / n, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W.grad.double(), W2.grad, rtol=1e-5, atol=1e-7)
    # kl_loss is the clamped KL part: sft_loss + kl_loss == loss
    torch.testing.assert_close(out.sft_loss + out.kl_loss, out.loss.detach(), rtol=1e-5, atol=1e-7)
    assert "kl_clamp=1.0" in repr(loss_fn)


def test_dss_loss_clamp_errors():
    with pytest.raises(ValueError, match="kl_clamp must be a finite number > 0"):
        DSSLoss(kl_clamp=0.0)
    with pytest.raises(ValueError, match="kl_clamp must be a finite number > 0"):
        DSSLoss(kl_clamp=math.inf)
    with pytest.raises(ValueError, match="kl_clamp applies to kl='k2'"):
        DSSLoss(kl="full", fused=False, kl_clamp=10.0)


def test_hf_entry_points_take_the_clamp():
    from safeshape import hf

    assert hf._loss_module("dss", 0.5, 10.0, (), True).params() == [0.5, 10.0]
    assert hf._loss_module("dss", 0.5, None, (), True).params() == [0.5]
    with pytest.raises(SafeshapeError, match="kl_clamp must be a finite number > 0"):
        hf._check_clamp("safeshape.hf.token_loss", "dss", -1.0)
    with pytest.raises(SafeshapeError, match="kl_clamp applies to loss dss"):
        hf._check_clamp("safeshape.hf.token_loss", "deep-token", 10.0)
    assert hf._check_clamp("x", "dss", 10) == 10.0 and hf._check_clamp("x", "dss", None) is None


def test_train_flag():
    from safeshape.trainer.cli import add_arguments
    from safeshape.trainer.config import TrainConfig
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--dss-kl-clamp", "10"])
    assert ns.dss_kl_clamp == 10.0
    assert TrainConfig(model="m", data="d", out="o").dss_kl_clamp is None
    assert TrainConfig(model="m", data="d", out="o", dss_kl_clamp=10).dss_kl_clamp == 10
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(SafeshapeError, match="--dss-kl-clamp: must be a finite number > 0"):
            TrainConfig(model="m", data="d", out="o", dss_kl_clamp=bad)
    with pytest.raises(SafeshapeError, match="--dss-kl-clamp: applies to --loss dss"):
        TrainConfig(model="m", data="d", out="o", loss="sft", dss_kl_clamp=10.0)


def test_train_run_builds_the_clamped_loss(tmp_path):
    from safeshape import testing
    from safeshape.trainer import TrainConfig
    from safeshape.trainer.distributed import Dist
    from safeshape.trainer.loop import Run

    model = str(testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320))
    data = str(testing.write_tiny_dataset(tmp_path / "dss.jsonl", 4, "dss", seed=5))
    run = Run(TrainConfig(model=model, data=data, out=str(tmp_path / "o"), loss="dss", dss_kl_clamp=10.0,
                          batch_size=4, lora_r=4, max_len=96, progress=False, device="cpu"), Dist())
    assert run.loss_module.params() == [0.5, 10.0]
    assert math.isfinite(run.train_step(0)["loss"])


def test_hf_token_loss_with_clamp_equals_the_formula(tmp_path):
    from transformers import AutoTokenizer

    from safeshape import hf, testing
    from tests.stacks_worker import lora_model

    path = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    tok = AutoTokenizer.from_pretrained(path)
    rows = hf.encode_rows(testing.write_tiny_dataset(tmp_path / "rows.jsonl", 4, "dss", seed=11), tok, loss="dss",
                          max_len=128)
    batch = hf.DSSDataCollator(tok)(rows)
    model = lora_model(path)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels, w = batch["labels"][:, 1:], batch["star_weights"][:, 1:]
    mask = labels != IGNORE
    idx = labels.clamp(min=0).unsqueeze(-1)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, idx).squeeze(-1)
    lref = torch.log_softmax(ref[:, :-1], -1).gather(-1, idx).squeeze(-1)
    k2 = 0.5 * (lp - lref) ** 2
    clamp = float(k2[mask & (w < 1)].detach().median())  # the bound acts on about half the KL tokens
    want = (w * -lp + 0.5 * (1 - w) * k2.clamp(min=-clamp, max=clamp))[mask].sum() / mask.sum()
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got, _ = hf.token_loss(model, batch, loss="dss", kl_coef=0.5, kl_clamp=clamp)
    got.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)
    unclamped, _ = hf.token_loss(model, batch, loss="dss", kl_coef=0.5)
    assert float(unclamped) > float(got)
