"""Token-loss ops (docs/math.md#dss-loss, docs/math.md#deep-token) against the plain-torch reference evaluated in float64 on the same values:
every objective (sft, dss_k2, deep_token, logprob), unfused and lm-head-fused, forward and backward with
non-uniform upstream gradients, gradcheck in float64, opcheck of every op, and the edge cases of issue 10."""
import pytest
import torch

from safeshape import ops, reference
from tests.conftest import DEVICES

IGNORE = -100
SHAPES = [(1, 1), (7, 13), (33, 1000), (5, 4099), (64, 257)]  # single column, odd vocab, many rows
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# loss / logprobs are float32 (float64) whatever the input; the gradient has the input's dtype
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}
LOSS_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
BETAS = [0.5, 2.0, 2.0, 2.0, 2.0, 0.1]
OBJECTIVES = {"sft": [], "dss_k2": [0.5], "deep_token": BETAS, "logprob": []}


def rel(got, want):
    got, want = got.double(), want.double()
    den = want.norm()
    return ((got - want).norm() / den).item() if den > 0 else got.norm().item()


def make_case(n, v, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        labels[torch.randperm(n, generator=g)[: n // 4]] = IGNORE
    weights = torch.rand(n, generator=g)
    weights[::3] = 0.0  # weights 0, 1 and fractional
    weights[1::3] = 1.0
    ref = -torch.rand(n, generator=g) * 8.0
    grad = torch.randn(n, generator=g) * 3.0  # non-uniform upstream gradient
    if dtype == torch.float64:  # per-row inputs in the statistics' dtype
        weights, ref, grad = weights.double(), ref.double(), grad.double()
    return [t.to(device) for t in (logits, labels, weights, ref, grad)]


def positions_for(n, device, seed=0):
    """1-based response positions of n tokens cut into a few rows of random length."""
    g = torch.Generator().manual_seed(seed + 50)
    pos = []
    while len(pos) < n:
        length = int(torch.randint(1, 9, (1,), generator=g))
        pos += list(range(1, length + 1))
    return torch.tensor(pos[:n], device=device)


def objective_kw(objective, weights, ref, positions):
    if objective == "dss_k2":
        return dict(weights=weights, ref_logprobs=ref)
    if objective == "deep_token":
        return dict(ref_logprobs=ref, positions=positions)
    return dict(weights=weights)


def value_and_grads(fn, leaves, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    (out * grad_out.to(out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def unfused(objective, labels, kw):
    return lambda z: ops.token_objective(ops.token_logprobs(z, labels), labels, objective, OBJECTIVES[objective], **kw)


def ref_unfused(objective, labels, kw):
    return lambda z: reference.token_objective(reference.token_logprobs(z, labels), labels, objective,
                                               OBJECTIVES[objective], **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_matches_reference(shape, dtype, device):
    logits, labels, _, _, g = make_case(*shape, dtype, device, seed=1)
    got, (gz,) = value_and_grads(lambda z: ops.token_logprobs(z, labels), [logits], g)
    want, (wz,) = value_and_grads(lambda z: reference.token_logprobs(z, labels), [logits.double()], g)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == labels.shape
    assert gz.dtype == dtype
    assert rel(got, want) <= LOSS_TOL[dtype]
    assert rel(gz, wz) <= GRAD_TOL[dtype]
    assert (got <= 0).all()
    ignored = labels == IGNORE
    assert (got[ignored] == 0).all() and (gz[ignored] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("shape", [(7, 13), (33, 1000), (64, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unfused_objective_matches_reference(objective, shape, dtype, device):
    logits, labels, weights, ref, g = make_case(*shape, dtype, device)
    kw = objective_kw(objective, weights, ref, positions_for(shape[0], device))
    got, (gz,) = value_and_grads(unfused(objective, labels, kw), [logits], g)
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    want, (wz,) = value_and_grads(ref_unfused(objective, labels, kw64), [logits.double()], g)
    assert rel(got, want) <= LOSS_TOL[dtype] * 10
    assert rel(gz, wz) <= GRAD_TOL[dtype] * 10
    assert gz.dtype == dtype and (got[labels == IGNORE] == 0).all() and (gz[labels == IGNORE] == 0).all()


def test_deep_token_schedule_and_limits():
    # beta_t by position: 0.5 at 1, 2 at 2..5, 0.1 after (docs/math.md#deep-token)
    pos = torch.arange(1, 9)
    torch.testing.assert_close(reference.deep_token_betas(pos, BETAS),
                               torch.tensor([0.5, 2, 2, 2, 2, 0.1, 0.1, 0.1], dtype=torch.float64))
    lp = -torch.rand(8, dtype=torch.float64) * 3
    ref = -torch.rand(8, dtype=torch.float64) * 3
    labels = torch.zeros(8, dtype=torch.long)
    want = reference.token_objective(lp, labels, "deep_token", BETAS, ref_logprobs=ref, positions=pos)
    torch.testing.assert_close(ops.token_objective(lp, labels, "deep_token", BETAS, ref_logprobs=ref, positions=pos),
                               want, rtol=1e-12, atol=0)
    # small beta: the gradient of SFT (-1 per token); with a large beta a token far above the reference stops moving
    x = lp.clone().requires_grad_()
    ops.token_objective(x, labels, "deep_token", [1e-6], ref_logprobs=ref, positions=pos).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(lp, -1.0), rtol=0, atol=1e-5)
    x = lp.clone().requires_grad_()
    ops.token_objective(x, labels, "deep_token", [50.0], ref_logprobs=lp - 1.0, positions=pos).sum().backward()
    assert x.grad.abs().max() < 1e-20
    # the authors' surrogate loss -2 max(sigmoid(-beta r), 1e-3).detach() l has the same gradient where the clamp
    # does not bite (finetuning_buckets/trainer/trainer.py, soft_sft_loss)
    x = lp.clone().requires_grad_()
    ops.token_objective(x, labels, "deep_token", BETAS, ref_logprobs=ref, positions=pos).sum().backward()
    beta = reference.deep_token_betas(pos, BETAS)
    theirs = -2 * torch.clamp(1 - torch.sigmoid(beta * (lp - ref)), min=1e-3)
    torch.testing.assert_close(x.grad, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 13), (33, 1000), (5, 4099)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_kl_matches_reference(shape, dtype, device):
    logits, labels, _, _, g = make_case(*shape, dtype, device, seed=2)
    ref_logits = make_case(*shape, dtype, device, seed=3)[0]
    g2 = make_case(*shape, dtype, device, seed=4)[4]

    def both(fn, z):
        lp, kl = fn(z)
        return torch.stack([lp, kl])

    got, (gz,) = value_and_grads(lambda z: both(lambda x: ops.full_kl(x, ref_logits, labels), z), [logits],
                                 torch.stack([g, g2]))
    want, (wz,) = value_and_grads(lambda z: both(lambda x: reference.full_kl(x, ref_logits.double(), labels), z),
                                  [logits.double()], torch.stack([g, g2]))
    assert rel(got, want) <= LOSS_TOL[dtype] * 10
    assert rel(gz, wz) <= GRAD_TOL[dtype]
    assert (got[1] >= -1e-6).all()  # a KL divergence


def test_full_kl_refuses_ref_logits_with_grad():
    logits, labels, _, _, _ = make_case(4, 9, torch.float32, "cpu")
    with pytest.raises(ValueError, match="ref_logits"):
        ops.full_kl(logits, logits.clone().requires_grad_(), labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_full_kl_minus_inf_logits(dtype, device):
    # issue 10 item 16: p = 0 where a logit is -inf; 0 x -inf must not make the KL or its gradient NaN
    logits, labels, _, _, g = make_case(6, 40, dtype, device, seed=8)
    ref_logits = make_case(6, 40, dtype, device, seed=9)[0]
    labels[:] = torch.arange(6, device=device) + 20
    logits[:, :5] = float("-inf")  # p = 0, q > 0
    ref_logits[:, :8] = float("-inf")  # both 0 on 0..4, q = 0 with p > 0 on 5..7 would be an infinite KL: avoid
    logits[:, 5:8] = float("-inf")
    out, (gz,) = value_and_grads(lambda z: torch.stack(ops.full_kl(z, ref_logits, labels)), [logits],
                                 torch.stack([g, g]))
    assert torch.isfinite(out).all() and torch.isfinite(gz.double()).all()
    assert (gz[:, :8] == 0).all()
    want, (wz,) = value_and_grads(lambda z: torch.stack(reference.full_kl(z, ref_logits.double(), labels)),
                                  [logits.double()], torch.stack([g, g]))
    assert rel(out, want) <= 1e-6 and rel(gz, wz) <= GRAD_TOL[dtype]


def make_fused(n, h, v, dtype, device, seed=0):
    logits, labels, weights, ref, g = make_case(n, v, torch.float64, device, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5 * 2).to(dtype).to(device)
    return hidden, weight, labels, weights, ref, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("chunk_rows", [0, 3, 16])  # automatic (one chunk), many chunks with a ragged last one
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_reference_and_unfused(objective, chunk_rows, dtype, device):
    hidden, weight, labels, weights, ref, g = make_fused(37, 24, 301, dtype, device)
    kw = objective_kw(objective, weights, ref, positions_for(37, device))
    params = OBJECTIVES[objective]
    got, (gh, gW) = value_and_grads(
        lambda h, W: ops.fused_linear_token_loss(h, W, labels, objective, params, chunk_rows=chunk_rows, **kw)[0],
        [hidden, weight], g)
    want, (wh, wW) = value_and_grads(
        lambda h, W: reference.fused_linear_token_loss(h, W, labels, objective, params, **kw),
        [hidden.double(), weight.double()], g)
    # half inputs: the chunk's logits are rounded to the input dtype as in an unfused bf16 lm_head
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    assert rel(got, want) <= tol and rel(gh, wh) <= tol and rel(gW, wW) <= tol
    # the unfused ops on the same logits
    unf, (uh, uW) = value_and_grads(lambda h, W: unfused(objective, labels, kw)(h @ W.T), [hidden, weight], g)
    torch.testing.assert_close(got, unf, rtol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, atol=1e-5)
    lp, (glp,) = value_and_grads(lambda h: ops.fused_linear_token_logprobs(h, weight, labels, chunk_rows=chunk_rows),
                                 [hidden], g)
    wlp, (wglp,) = value_and_grads(lambda h: reference.fused_linear_token_logprobs(h, weight.double(), labels),
                                   [hidden.double()], g)
    assert rel(lp, wlp) <= tol and rel(glp, wglp) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_sum_matches_reference(objective, dtype, device):
    hidden, weight, labels, weights, ref, _ = make_fused(29, 16, 211, dtype, device, seed=5)
    kw = objective_kw(objective, weights, ref, positions_for(29, device, seed=5))
    params = OBJECTIVES[objective]
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, per_token, logprobs = ops.fused_linear_token_loss_sum(h1, w1, labels, objective, params, chunk_rows=4,
                                                                 **kw)
    (total * 2.5).backward()  # a scalar upstream gradient other than 1
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.fused_linear_token_loss(h2, w2, labels, objective, params, **kw)
    (want.sum() * 2.5).backward()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    assert rel(total, want.sum()) <= tol and rel(per_token, want) <= tol
    assert rel(h1.grad, h2.grad) <= tol and rel(w1.grad, w2.grad) <= tol
    assert rel(logprobs, reference.fused_linear_token_logprobs(h2, w2, labels)) <= tol
    assert not logprobs.requires_grad and not per_token.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_fused_per_token_upstream_gradient(device):
    # The Liger bug: gradients formed in the forward for a uniform upstream gradient are wrong when the upstream
    # gradient differs per token. Zero and large upstream gradients on some rows must change the result exactly.
    hidden, weight, labels, weights, ref, _ = make_fused(12, 8, 50, torch.float64, device, seed=7)
    labels[:] = torch.arange(12, device=device) % 50
    g = torch.zeros(12, dtype=torch.float64, device=device)
    g[3], g[7] = 5.0, -2.0
    kw = dict(weights=weights, ref_logprobs=ref)
    _, (gh, gW) = value_and_grads(
        lambda h, W: ops.fused_linear_token_loss(h, W, labels, "dss_k2", [0.5], chunk_rows=5, **kw)[0],
        [hidden, weight], g)
    _, (wh, wW) = value_and_grads(lambda h, W: reference.fused_linear_token_loss(h, W, labels, "dss_k2", [0.5], **kw),
                                  [hidden, weight], g)
    assert rel(gh, wh) <= 1e-12 and rel(gW, wW) <= 1e-12
    assert (gh[g == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_gradcheck_float64(objective, device):
    logits, labels, weights, ref, _ = make_case(6, 9, torch.float64, device, seed=11)
    kw = objective_kw(objective, weights, ref, positions_for(6, device))
    params = OBJECTIVES[objective]
    z = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(unfused(objective, labels, kw), (z,))
    lp = reference.token_logprobs(logits, labels).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.token_objective(x, labels, objective, params, **kw), (lp,))
    hidden, weight, flabels, fweights, fref, _ = make_fused(7, 5, 11, torch.float64, device, seed=13)
    fkw = objective_kw(objective, fweights, fref, positions_for(7, device))
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, W: ops.fused_linear_token_loss(h, W, flabels, objective, params, chunk_rows=3, **fkw), (h, W))
    assert torch.autograd.gradcheck(
        lambda h, W: ops.fused_linear_token_loss_sum(h, W, flabels, objective, params, chunk_rows=4, **fkw)[0], (h, W))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64_row_ops(device):
    logits, labels, _, _, _ = make_case(6, 9, torch.float64, device, seed=11)
    ref_logits = make_case(6, 9, torch.float64, device, seed=12)[0]
    z = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: ops.token_logprobs(z, labels), (z,))
    assert torch.autograd.gradcheck(lambda z: ops.full_kl(z, ref_logits, labels), (z,))
    hidden, weight, flabels, _, _, _ = make_fused(7, 5, 11, torch.float64, device, seed=13)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda h, W: ops.fused_linear_token_logprobs(h, W, flabels, chunk_rows=2), (h, W))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, device):
    sop = torch.ops.safeshape
    logits, labels, weights, ref, g = make_case(9, 17, dtype, device, seed=21)
    ref_logits = make_case(9, 17, dtype, device, seed=22)[0]
    st = torch.float64 if dtype == torch.float64 else torch.float32
    weights, ref, g = weights.to(st), ref.to(st), g.to(st)
    pos = positions_for(9, device)
    z = logits.clone().requires_grad_()
    torch.library.opcheck(sop.token_logprobs.default, (z, labels, IGNORE))
    lp, lse = sop.token_logprobs(logits, labels, IGNORE)
    torch.library.opcheck(sop.token_logprobs_backward_.default, (logits.clone(), g, labels, lse, IGNORE))
    for objective, params in OBJECTIVES.items():
        opt = (weights, ref, pos)
        torch.library.opcheck(sop.token_objective.default,
                              (lp.clone().requires_grad_(), labels, *opt, objective, params, IGNORE))
    torch.library.opcheck(sop.full_kl.default, (z, ref_logits, labels, IGNORE))
    _, kl, lse, rlse = sop.full_kl(logits, ref_logits, labels, IGNORE)
    torch.library.opcheck(sop.full_kl_backward.default, (g, g * 0.5, logits, ref_logits, labels, lse, rlse, kl, IGNORE))
    hidden, weight, flabels, fw, fr, _ = make_fused(9, 6, 17, dtype, device, seed=23)
    fw, fr = fw.to(st), fr.to(st)
    h = hidden.clone().requires_grad_()
    for objective, params in OBJECTIVES.items():
        for grad, grad_weight in ((False, False), (True, False), (True, True)):
            torch.library.opcheck(sop.fused_linear_token_loss.default,
                                  (h, weight, flabels, fw, fr, pos, objective, params, IGNORE, 4, grad, grad_weight,
                                   False))
    torch.library.opcheck(sop.fused_linear_token_loss.default,
                          (hidden.bfloat16(), weight.bfloat16(), flabels, None, None, None, "sft", [], IGNORE, 4,
                           True, True, True))


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_grad_weight_accumulator(device):
    # bfloat16 lm_head: a float32 accumulator rounds grad_weight once instead of once per chunk
    hidden, weight, labels, weights, _, _ = make_fused(96, 16, 64, torch.bfloat16, device, seed=31)
    labels[:] = torch.arange(96, device=device) % 64
    want = None
    errs = {}
    for wide in (False, True):
        out = torch.ops.safeshape.fused_linear_token_loss(hidden, weight, labels, weights, None, None, "sft", [],
                                                          IGNORE, 1, True, True, wide)
        gw = out[4]
        assert gw.dtype == (torch.float32 if wide else torch.bfloat16) and gw.shape == weight.shape
        if want is None:
            h, W = hidden.double().requires_grad_(), weight.double().requires_grad_()
            reference.fused_linear_token_loss(h, W, labels, "sft", weights=weights).sum().backward()
            want = W.grad
        errs[wide] = rel(gw, want)
    assert errs[True] < errs[False] / 2, errs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_ignored(dtype, device):
    logits, labels, weights, ref, g = make_case(6, 40, dtype, device)
    labels[:] = IGNORE
    kw = dict(weights=weights, ref_logprobs=ref)
    loss, (gz,) = value_and_grads(unfused("dss_k2", labels, kw), [logits], g)
    assert (loss == 0).all() and (gz == 0).all()
    hidden, weight, _, _, _, _ = make_fused(6, 8, 40, dtype, device)
    out, (gh, gW) = value_and_grads(
        lambda h, W: ops.fused_linear_token_loss(h, W, labels, "dss_k2", [0.5], **kw)[0], [hidden, weight], g)
    assert (out == 0).all() and (gh == 0).all() and (gW == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_dss_weight_special_cases(device):
    logits, labels, _, ref, _ = make_case(8, 50, torch.float64, device, seed=4)
    labels[:] = torch.arange(8, device=device)
    lp = reference.token_logprobs(logits, labels)
    ones, zeros = torch.ones_like(ref), torch.zeros_like(ref)

    def dss(w):
        return ops.token_objective(ops.token_logprobs(logits, labels), labels, "dss_k2", [0.9], weights=w,
                                   ref_logprobs=ref)

    # w = 1: pure cross-entropy whatever kl_coef; w = 0: pure k2 KL term
    torch.testing.assert_close(dss(ones), -lp, rtol=1e-12, atol=0)
    torch.testing.assert_close(dss(zeros), 0.9 * 0.5 * (lp - ref) ** 2, rtol=1e-12, atol=0)
    half = torch.full_like(ref, 0.25)
    torch.testing.assert_close(dss(half), 0.25 * -lp + 0.9 * 0.75 * 0.5 * (lp - ref) ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama3_vocab_few_rows(dtype, device):
    logits, labels, weights, ref, g = make_case(3, 128256, dtype, device, seed=9)
    labels[1] = 128255  # the last column
    got, (gz,) = value_and_grads(lambda z: ops.token_logprobs(z, labels), [logits], g)
    want, (wz,) = value_and_grads(lambda z: reference.token_logprobs(z, labels), [logits.double()], g)
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits_stay_finite(dtype, device):
    logits, labels, weights, ref, g = make_case(8, 300, torch.float64, device, seed=6)
    logits = torch.where(logits > 0, 1e4, -1e4).to(dtype)
    ref_logits = (-logits.double()).to(dtype)
    labels[:] = torch.arange(8, device=device) * 7
    kw = dict(weights=weights, ref_logprobs=ref)
    for fn in (unfused("dss_k2", labels, kw), lambda z: ops.token_logprobs(z, labels),
               lambda z: torch.stack(ops.full_kl(z, ref_logits, labels)).sum(0)):
        out, (gz,) = value_and_grads(fn, [logits], g)
        assert torch.isfinite(out).all() and torch.isfinite(gz.float()).all()
    got, (gz,) = value_and_grads(unfused("dss_k2", labels, kw), [logits], g)
    want, (wz,) = value_and_grads(ref_unfused("dss_k2", labels, kw), [logits.double()], g)
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_minus_inf_logits(dtype, device):
    # vocabulary masking with -inf (never at the label): zero probability, finite loss and gradient
    logits, labels, weights, ref, g = make_case(6, 70, dtype, device, seed=8)
    labels[:] = torch.arange(6, device=device) + 10
    logits[:, :10] = float("-inf")
    logits[:, 40:45] = float("-inf")
    kw = dict(weights=weights, ref_logprobs=ref)
    got, (gz,) = value_and_grads(unfused("dss_k2", labels, kw), [logits], g)
    want, (wz,) = value_and_grads(ref_unfused("dss_k2", labels, kw), [logits.double()], g)
    assert torch.isfinite(got).all() and torch.isfinite(gz.float()).all()
    assert (gz[:, :10] == 0).all()
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_logit_propagates(dtype, device):
    # issue 10 item 14: a NaN logit gives a NaN log-probability (and KL) in its row on every device, never a
    # finite value that hides it; the other rows are untouched
    logits, labels, _, _, g = make_case(5, 300, dtype, device, seed=14)
    labels[:] = torch.arange(5, device=device)
    logits[2, 77] = float("nan")  # not the label
    logits[4, 250] = float("nan")
    lp = ops.token_logprobs(logits, labels)
    _, kl = ops.full_kl(logits, logits.clone(), labels)
    for out in (lp, kl):
        assert torch.isnan(out[2]) and torch.isnan(out[4]) and torch.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_logits(device):
    logits, labels, weights, ref, g = make_case(40, 30, torch.float32, device)
    z = logits.T.contiguous().T  # column-major view
    assert not z.is_contiguous()
    kw = dict(weights=weights, ref_logprobs=ref)
    got, (gz,) = value_and_grads(unfused("dss_k2", labels, kw), [z], g)
    want, (wz,) = value_and_grads(ref_unfused("dss_k2", labels, kw), [logits.double()], g)
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= 1e-6


def test_bad_input_names_the_argument():
    logits, labels, weights, ref, _ = make_case(5, 10, torch.float32, "cpu")
    bad = labels.clone()
    bad[2] = 10
    with pytest.raises(RuntimeError, match=r"token_logprobs: labels\[2\] = 10 is outside \[0, 10\)"):
        ops.token_logprobs(logits, bad)
    lp = ops.token_logprobs(logits, labels)
    with pytest.raises(RuntimeError, match="token_objective: weights must have shape"):
        ops.token_objective(lp, labels, "sft", weights=weights[:3])
    with pytest.raises(RuntimeError, match="objective 'dss_k2' needs weights and ref_logprobs"):
        ops.token_objective(lp, labels, "dss_k2", [0.5], weights=weights)
    with pytest.raises(RuntimeError, match="objective 'deep_token' needs ref_logprobs and positions"):
        ops.token_objective(lp, labels, "deep_token", BETAS, ref_logprobs=ref)
    with pytest.raises(RuntimeError, match="objective must be one of"):
        ops.token_objective(lp, labels, "dpo")
    with pytest.raises(RuntimeError, match="deep_token betas must be > 0"):
        ops.token_objective(lp, labels, "deep_token", [0.5, 0.0], ref_logprobs=ref, positions=labels.abs())
    with pytest.raises(RuntimeError, match="token_logprobs: logits must be 2-D"):
        ops.token_logprobs(logits[None], labels)
    with pytest.raises(RuntimeError, match="labels must be an integer tensor"):
        ops.token_logprobs(logits, labels.float())
    hidden, weight, *_ = make_fused(5, 4, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="fused_linear_token_loss: weight is \\[vocab, hidden\\]"):
        ops.fused_linear_token_loss(hidden, weight[:, :3], labels, "sft")
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ops.fused_linear_token_loss(hidden, weight.double(), labels, "sft")
    with pytest.raises(RuntimeError, match=r"fused_linear_token_loss: labels\[2\] = 10"):
        ops.fused_linear_token_loss(hidden, weight, bad, "sft")


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_lm_head_gets_no_weight_gradient(device):
    # LoRA: the lm_head is frozen, so the fused ops must not form (or allocate) its [V, H] gradient
    hidden, weight, labels, weights, ref, g = make_fused(13, 6, 29, torch.float64, device, seed=3)
    kw = dict(weights=weights, ref_logprobs=ref)
    h = hidden.clone().requires_grad_()
    (ops.fused_linear_token_loss(h, weight, labels, "dss_k2", [0.5], chunk_rows=4, **kw)[0] * g).sum().backward()
    h2 = hidden.clone().requires_grad_()
    total, _, _ = ops.fused_linear_token_loss_sum(h2, weight, labels, "dss_k2", [0.5], chunk_rows=4, **kw)
    total.backward()
    h3 = hidden.clone().requires_grad_()
    want = reference.fused_linear_token_loss(h3, weight, labels, "dss_k2", [0.5], **kw)
    (gh_tok,) = torch.autograd.grad((want * g).sum(), h3, retain_graph=True)
    (gh_sum,) = torch.autograd.grad(want.sum(), h3)
    assert rel(h.grad, gh_tok) <= 1e-12 and rel(h2.grad, gh_sum) <= 1e-12 and weight.grad is None
    out = torch.ops.safeshape.fused_linear_token_loss(hidden, weight, labels, weights, ref, None, "dss_k2", [0.5],
                                                      IGNORE, 4, True, False, False)
    assert out[4].shape == (0,) and rel(out[3], gh_sum) <= 1e-12


def test_fused_sum_second_backward_recomputes():
    # the first backward hands its buffers over (scaled in place); a retained graph's second backward recomputes
    hidden, weight, labels, weights, ref, _ = make_fused(5, 4, 11, torch.float64, "cpu")
    h = hidden.clone().requires_grad_()
    total, _, _ = ops.fused_linear_token_loss_sum(h, weight, labels, "dss_k2", [0.5], weights=weights,
                                                  ref_logprobs=ref)
    (g1,) = torch.autograd.grad(total * 3.0, h, retain_graph=True)
    (g2,) = torch.autograd.grad(total * 3.0, h)
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=0)


@pytest.mark.skipif(not DEVICES[1:] or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bad_label_gives_nan_without_host_sync():
    # on CUDA the labels are not read back (no host sync: CUDA graphs can capture the ops); a label outside the
    # vocabulary gives NaN in its row instead of reading out of bounds
    logits, labels, _, _, _ = make_case(4, 10, torch.float32, "cuda")
    labels[:] = torch.tensor([1, 2, 10, IGNORE], device="cuda")
    lp = ops.token_logprobs(logits, labels)
    assert torch.isfinite(lp[:2]).all() and torch.isnan(lp[2]) and lp[3] == 0
