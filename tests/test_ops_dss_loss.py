"""DSS loss ops (docs/math.md#dss-loss, docs/math.md#dss-gradient, docs/math.md#dss-full-kl) against the
plain-torch reference evaluated in float64 on the same values:
forward and backward with non-uniform upstream gradients, gradcheck in float64, opcheck of every op."""
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


def value_and_grads(fn, leaves, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    (out * grad_out.to(out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dss_loss_matches_reference(shape, dtype, device):
    logits, labels, weights, ref, g = make_case(*shape, dtype, device)
    got, (gz, gw, gr) = value_and_grads(lambda z, w, r: ops.dss_loss(z, labels, w, r, 0.5), [logits, weights, ref], g)
    want, (wz, ww, wr) = value_and_grads(lambda z, w, r: reference.dss_loss(z, labels, w, r, 0.5),
                                         [logits.double(), weights.double(), ref.double()], g)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == labels.shape
    assert gz.dtype == dtype
    assert rel(got, want) <= LOSS_TOL[dtype]
    assert rel(gz, wz) <= GRAD_TOL[dtype]
    assert rel(gw, ww) <= LOSS_TOL[dtype] and rel(gr, wr) <= LOSS_TOL[dtype]
    ignored = labels == IGNORE
    assert (got[ignored] == 0).all() and (gz[ignored] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_matches_reference(shape, dtype, device):
    logits, labels, _, _, g = make_case(*shape, dtype, device, seed=1)
    got, (gz,) = value_and_grads(lambda z: ops.token_logprobs(z, labels), [logits], g)
    want, (wz,) = value_and_grads(lambda z: reference.token_logprobs(z, labels), [logits.double()], g)
    assert rel(got, want) <= LOSS_TOL[dtype]
    assert rel(gz, wz) <= GRAD_TOL[dtype]
    assert (got <= 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 13), (33, 1000), (5, 4099)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_kl_matches_reference(shape, dtype, device):
    logits, labels, weights, _, g = make_case(*shape, dtype, device, seed=2)
    ref_logits = make_case(*shape, dtype, device, seed=3)[0]
    got, (gz, gw) = value_and_grads(lambda z, w: ops.dss_loss_full_kl(z, labels, w, ref_logits, 0.7),
                                    [logits, weights], g)
    want, (wz, ww) = value_and_grads(lambda z, w: reference.dss_loss_full_kl(z, labels, w, ref_logits.double(), 0.7),
                                     [logits.double(), weights.double()], g)
    assert rel(got, want) <= LOSS_TOL[dtype]
    assert rel(gz, wz) <= GRAD_TOL[dtype]
    assert rel(gw, ww) <= LOSS_TOL[dtype]
    _, _, kl = ops.dss_loss_full_kl_and_parts(logits, labels, weights, ref_logits, 0.7)
    assert (kl >= -1e-6).all()  # a KL divergence


def test_full_kl_refuses_ref_logits_with_grad():
    logits, labels, weights, _, _ = make_case(4, 9, torch.float32, "cpu")
    with pytest.raises(ValueError, match="ref_logits"):
        ops.dss_loss_full_kl(logits, labels, weights, logits.clone().requires_grad_(), 0.5)


def make_fused(n, h, v, dtype, device, seed=0):
    logits, labels, weights, ref, g = make_case(n, v, torch.float64, device, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5 * 2).to(dtype).to(device)
    return hidden, weight, labels, weights, ref, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_rows", [0, 3, 16])  # automatic (one chunk), many chunks with a ragged last one
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_reference_and_unfused(chunk_rows, dtype, device):
    hidden, weight, labels, weights, ref, g = make_fused(37, 24, 301, dtype, device)
    got, (gh, gW) = value_and_grads(
        lambda h, W: ops.fused_linear_dss_loss(h, W, labels, weights, ref, 0.5, chunk_rows=chunk_rows),
        [hidden, weight], g)
    want, (wh, wW) = value_and_grads(lambda h, W: reference.fused_linear_dss_loss(h, W, labels, weights, ref, 0.5),
                                     [hidden.double(), weight.double()], g)
    # half inputs: the chunk's logits are rounded to the input dtype as in an unfused bf16 lm_head
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    assert rel(got, want) <= tol and rel(gh, wh) <= tol and rel(gW, wW) <= tol
    # the unfused op on the same logits
    unf, (uh, uW) = value_and_grads(lambda h, W: ops.dss_loss(h @ W.T, labels, weights, ref, 0.5), [hidden, weight], g)
    torch.testing.assert_close(got, unf, rtol=1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, atol=1e-5)
    lp, (glp,) = value_and_grads(lambda h: ops.fused_linear_token_logprobs(h, weight, labels, chunk_rows=chunk_rows),
                                 [hidden], g)
    wlp, (wglp,) = value_and_grads(lambda h: reference.fused_linear_token_logprobs(h, weight.double(), labels),
                                   [hidden.double()], g)
    assert rel(lp, wlp) <= tol and rel(glp, wglp) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_sum_matches_reference(dtype, device):
    hidden, weight, labels, weights, ref, _ = make_fused(29, 16, 211, dtype, device, seed=5)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    total, per_token, logprobs = ops.fused_linear_dss_loss_sum(h1, w1, labels, weights, ref, 0.5, chunk_rows=4)
    (total * 2.5).backward()  # a scalar upstream gradient other than 1
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.fused_linear_dss_loss(h2, w2, labels, weights, ref, 0.5)
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
    _, (gh, gW) = value_and_grads(lambda h, W: ops.fused_linear_dss_loss(h, W, labels, weights, ref, 0.5, chunk_rows=5),
                                  [hidden, weight], g)
    _, (wh, wW) = value_and_grads(lambda h, W: reference.fused_linear_dss_loss(h, W, labels, weights, ref, 0.5),
                                  [hidden, weight], g)
    assert rel(gh, wh) <= 1e-12 and rel(gW, wW) <= 1e-12
    assert (gh[g == 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    logits, labels, weights, ref, _ = make_case(6, 9, torch.float64, device, seed=11)
    ref_logits = make_case(6, 9, torch.float64, device, seed=12)[0]
    z = logits.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    r = ref.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z, w, r: ops.dss_loss(z, labels, w, r, 0.5), (z, w, r))
    assert torch.autograd.gradcheck(lambda z: ops.token_logprobs(z, labels), (z,))
    assert torch.autograd.gradcheck(lambda z, w: ops.dss_loss_full_kl(z, labels, w, ref_logits, 0.5), (z, w))
    hidden, weight, flabels, fweights, fref, _ = make_fused(7, 5, 11, torch.float64, device, seed=13)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fw, fr = fweights.clone().requires_grad_(), fref.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, W, w, r: ops.fused_linear_dss_loss(h, W, flabels, w, r, 0.5, chunk_rows=3), (h, W, fw, fr))
    assert torch.autograd.gradcheck(
        lambda h, W: ops.fused_linear_token_logprobs(h, W, flabels, chunk_rows=2), (h, W))
    assert torch.autograd.gradcheck(
        lambda h, W: ops.fused_linear_dss_loss_sum(h, W, flabels, fweights, fref, 0.5, chunk_rows=4)[0], (h, W))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, device):
    sop = torch.ops.safeshape
    logits, labels, weights, ref, g = make_case(9, 17, dtype, device, seed=21)
    ref_logits = make_case(9, 17, dtype, device, seed=22)[0]
    st = torch.float64 if dtype == torch.float64 else torch.float32
    weights, ref, g = weights.to(st), ref.to(st), g.to(st)
    z = logits.clone().requires_grad_()
    torch.library.opcheck(sop.token_logprobs.default, (z, labels, IGNORE))
    torch.library.opcheck(sop.dss_loss.default, (z, labels, weights.clone().requires_grad_(), ref, 0.5, IGNORE))
    _, lp, lse = sop.dss_loss(logits, labels, weights, ref, 0.5, IGNORE)
    torch.library.opcheck(sop.dss_loss_backward.default, (g, logits, labels, weights, ref, lp, lse, 0.5, IGNORE))
    torch.library.opcheck(sop.dss_loss_full_kl.default, (z, labels, weights, ref_logits, 0.5, IGNORE))
    _, _, kl, lse, rlse = sop.dss_loss_full_kl(logits, labels, weights, ref_logits, 0.5, IGNORE)
    torch.library.opcheck(sop.dss_loss_full_kl_backward.default,
                          (g, logits, labels, weights, ref_logits, lse, rlse, kl, 0.5, IGNORE))
    hidden, weight, flabels, fw, fr, fg = make_fused(9, 6, 17, dtype, device, seed=23)
    fw, fr, fg = fw.to(st), fr.to(st), fg.to(st)
    h = hidden.clone().requires_grad_()
    torch.library.opcheck(sop.fused_linear_token_logprobs.default, (h, weight, flabels, IGNORE, 4))
    torch.library.opcheck(sop.fused_linear_dss_loss.default, (h, weight, flabels, fw, fr, 0.5, IGNORE, 4))
    _, lp, lse = sop.fused_linear_dss_loss(hidden, weight, flabels, fw, fr, 0.5, IGNORE, 4)
    torch.library.opcheck(sop.fused_linear_dss_loss_backward.default,
                          (fg, hidden, weight, flabels, fw, fr, lp, lse, 0.5, IGNORE, 4, True))
    torch.library.opcheck(sop.fused_linear_dss_loss_backward.default,
                          (fg, hidden, weight, flabels, fw, fr, lp, lse, 0.5, IGNORE, 4, False))
    for need_weight in (True, False):
        torch.library.opcheck(sop.fused_linear_dss_loss_with_grad.default,
                              (hidden, weight, flabels, fw, fr, fg, 0.5, IGNORE, 4, need_weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_ignored(dtype, device):
    logits, labels, weights, ref, g = make_case(6, 40, dtype, device)
    labels[:] = IGNORE
    loss, (gz,) = value_and_grads(lambda z: ops.dss_loss(z, labels, weights, ref, 0.5), [logits], g)
    assert (loss == 0).all() and (gz == 0).all()
    hidden, weight, _, _, _, _ = make_fused(6, 8, 40, dtype, device)
    out, (gh, gW) = value_and_grads(lambda h, W: ops.fused_linear_dss_loss(h, W, labels, weights, ref, 0.5),
                                    [hidden, weight], g)
    assert (out == 0).all() and (gh == 0).all() and (gW == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_weight_special_cases(device):
    logits, labels, _, ref, _ = make_case(8, 50, torch.float64, device, seed=4)
    labels[:] = torch.arange(8, device=device)
    lp = reference.token_logprobs(logits, labels)
    ones, zeros = torch.ones_like(ref), torch.zeros_like(ref)
    # w = 1: pure cross-entropy whatever kl_coef; w = 0: pure k2 KL term
    torch.testing.assert_close(ops.dss_loss(logits, labels, ones, ref, 0.9), -lp, rtol=1e-12, atol=0)
    torch.testing.assert_close(ops.dss_loss(logits, labels, zeros, ref, 0.9), 0.9 * 0.5 * (lp - ref) ** 2,
                               rtol=1e-12, atol=0)
    half = torch.full_like(ref, 0.25)
    torch.testing.assert_close(ops.dss_loss(logits, labels, half, ref, 0.9),
                               0.25 * -lp + 0.9 * 0.75 * 0.5 * (lp - ref) ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama3_vocab_few_rows(dtype, device):
    logits, labels, weights, ref, g = make_case(3, 128256, dtype, device, seed=9)
    labels[1] = 128255  # the last column
    got, (gz,) = value_and_grads(lambda z: ops.dss_loss(z, labels, weights, ref, 0.5), [logits], g)
    want, (wz,) = value_and_grads(lambda z: reference.dss_loss(z, labels, weights, ref, 0.5), [logits.double()], g)
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits_stay_finite(dtype, device):
    logits, labels, weights, ref, g = make_case(8, 300, torch.float64, device, seed=6)
    logits = torch.where(logits > 0, 1e4, -1e4).to(dtype)
    ref_logits = (-logits.double()).to(dtype)
    labels[:] = torch.arange(8, device=device) * 7
    for fn in (lambda z: ops.dss_loss(z, labels, weights, ref, 0.5),
               lambda z: ops.token_logprobs(z, labels),
               lambda z: ops.dss_loss_full_kl(z, labels, weights, ref_logits, 0.5)):
        out, (gz,) = value_and_grads(fn, [logits], g)
        assert torch.isfinite(out).all() and torch.isfinite(gz.float()).all()
    got, (gz,) = value_and_grads(lambda z: ops.dss_loss(z, labels, weights, ref, 0.5), [logits], g)
    want, (wz,) = value_and_grads(lambda z: reference.dss_loss(z, labels, weights, ref, 0.5), [logits.double()], g)
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_minus_inf_logits(dtype, device):
    # vocabulary masking with -inf (never at the label): zero probability, finite loss and gradient
    logits, labels, weights, ref, g = make_case(6, 70, dtype, device, seed=8)
    labels[:] = torch.arange(6, device=device) + 10
    logits[:, :10] = float("-inf")
    logits[:, 40:45] = float("-inf")
    got, (gz,) = value_and_grads(lambda z: ops.dss_loss(z, labels, weights, ref, 0.5), [logits], g)
    want, (wz,) = value_and_grads(lambda z: reference.dss_loss(z, labels, weights, ref, 0.5), [logits.double()], g)
    assert torch.isfinite(got).all() and torch.isfinite(gz.float()).all()
    assert (gz[:, :10] == 0).all()
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_logits(device):
    logits, labels, weights, ref, g = make_case(40, 30, torch.float32, device)
    z = logits.T.contiguous().T  # column-major view
    assert not z.is_contiguous()
    got, (gz,) = value_and_grads(lambda x: ops.dss_loss(x, labels, weights, ref, 0.5), [z], g)
    want, (wz,) = value_and_grads(lambda x: reference.dss_loss(x, labels, weights, ref, 0.5), [logits.double()], g)
    assert rel(got, want) <= 1e-6 and rel(gz, wz) <= 1e-6


def test_bad_input_names_the_argument():
    logits, labels, weights, ref, _ = make_case(5, 10, torch.float32, "cpu")
    bad = labels.clone()
    bad[2] = 10
    with pytest.raises(RuntimeError, match=r"dss_loss: labels\[2\] = 10 is outside \[0, 10\)"):
        ops.dss_loss(logits, bad, weights, ref, 0.5)
    with pytest.raises(RuntimeError, match="dss_loss: weights must have shape"):
        ops.dss_loss(logits, labels, weights[:3], ref, 0.5)
    with pytest.raises(RuntimeError, match="token_logprobs: logits must be 2-D"):
        ops.token_logprobs(logits[None], labels)
    with pytest.raises(RuntimeError, match="labels must be an integer tensor"):
        ops.token_logprobs(logits, labels.float())
    hidden, weight, *_ = make_fused(5, 4, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="fused_linear_dss_loss: weight is \\[vocab, hidden\\]"):
        ops.fused_linear_dss_loss(hidden, weight[:, :3], labels, weights, ref, 0.5)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ops.fused_linear_dss_loss(hidden, weight.double(), labels, weights, ref, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_lm_head_gets_no_weight_gradient(device):
    # LoRA: the lm_head is frozen, so the fused ops must not form (or allocate) its [V, H] gradient
    hidden, weight, labels, weights, ref, g = make_fused(13, 6, 29, torch.float64, device, seed=3)
    h = hidden.clone().requires_grad_()
    (ops.fused_linear_dss_loss(h, weight, labels, weights, ref, 0.5, chunk_rows=4) * g).sum().backward()
    h2 = hidden.clone().requires_grad_()
    total, _, _ = ops.fused_linear_dss_loss_sum(h2, weight, labels, weights, ref, 0.5, chunk_rows=4)
    total.backward()
    h3 = hidden.clone().requires_grad_()
    want = reference.fused_linear_dss_loss(h3, weight, labels, weights, ref, 0.5)
    (gh_tok,) = torch.autograd.grad((want * g).sum(), h3, retain_graph=True)
    (gh_sum,) = torch.autograd.grad(want.sum(), h3)
    assert rel(h.grad, gh_tok) <= 1e-12 and rel(h2.grad, gh_sum) <= 1e-12 and weight.grad is None
    _, _, gh, gw = torch.ops.safeshape.fused_linear_dss_loss_with_grad(hidden, weight, labels, weights, ref,
                                                                       torch.ones_like(ref), 0.5, IGNORE, 4, False)
    assert gw.shape == (0,) and rel(gh, gh_sum) <= 1e-12


def test_fused_sum_second_backward_recomputes():
    # the first backward hands its buffers over (scaled in place); a retained graph's second backward recomputes
    hidden, weight, labels, weights, ref, _ = make_fused(5, 4, 11, torch.float64, "cpu")
    h = hidden.clone().requires_grad_()
    total, _, _ = ops.fused_linear_dss_loss_sum(h, weight, labels, weights, ref, 0.5)
    (g1,) = torch.autograd.grad(total * 3.0, h, retain_graph=True)
    (g2,) = torch.autograd.grad(total * 3.0, h)
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=0)
