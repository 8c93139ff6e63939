"""safeshape.loss.DSSLoss and DeepTokenLoss: the reduction (valid tokens or num_items_in_batch), the sft/kl parts,
fused == unfused, k micro-batches == one batch, and the SFT and rejection-sampling special cases against torch's
cross-entropy."""
import pytest
import torch
import torch.nn.functional as F

from safeshape import reference
from safeshape.loss import DeepTokenLoss, DSSLoss, response_positions, rs_weights, sft_weights
from tests.conftest import DEVICES

IGNORE = -100


def make_batch(b, t, h, v, device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 2).to(dtype).to(device)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, : t // 3] = IGNORE  # the prompt
    labels[0, -2:] = IGNORE  # padding
    weights = torch.rand(b, t, generator=g)
    weights[:, ::4] = 0.0
    weights[:, 1::4] = 1.0
    ref = -torch.rand(b, t, generator=g) * 6
    return [x.to(device) for x in (hidden, weight, labels, weights, ref)]


def ref_loss(hidden, weight, labels, weights, ref, kl_coef, denom=None):
    per_token = reference.fused_linear_token_loss(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                                  "dss_k2", [kl_coef], weights=weights.reshape(-1),
                                                  ref_logprobs=ref.reshape(-1))
    n = int((labels != IGNORE).sum())
    return per_token.sum() / (denom if denom is not None else n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_loss_value_parts_and_gradients(fused, device):
    hidden, weight, labels, weights, ref = make_batch(3, 10, 16, 97, device)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_fn = DSSLoss(kl_coef=0.5, fused=fused, chunk_rows=7)
    if fused:
        out = loss_fn(labels=labels, weights=weights, ref_logprobs=ref, hidden=h, lm_head_weight=W)
    else:
        out = loss_fn(labels=labels, weights=weights, ref_logprobs=ref, logits=h @ W.T)
    out.loss.backward()
    h2, W2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = ref_loss(h2, W2, labels, weights, ref, 0.5)
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W.grad.double(), W2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.sft_loss + out.kl_loss, out.loss.detach(), rtol=1e-6, atol=1e-7)
    assert not out.sft_loss.requires_grad and not out.kl_loss.requires_grad
    valid = labels != IGNORE
    assert out.num_tokens == int(valid.sum())
    torch.testing.assert_close(out.mean_weight, weights[valid].mean(), rtol=1e-6, atol=0)
    # the sft part alone: sum w (-l) / N
    lp = reference.fused_linear_token_logprobs(h2.detach().reshape(-1, 16), W2.detach(), labels.reshape(-1))
    torch.testing.assert_close(out.sft_loss.double(), (weights.reshape(-1) * -lp).sum() / out.num_tokens,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_equals_unfused(device):
    hidden, weight, labels, weights, ref = make_batch(2, 12, 8, 61, device, seed=1)
    grads = []
    for fused in (True, False):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kwargs = dict(hidden=h, lm_head_weight=W) if fused else dict(logits=h @ W.T)
        out = DSSLoss(0.5, fused=fused)(labels=labels, weights=weights, ref_logprobs=ref, **kwargs)
        out.loss.backward()
        grads.append((out.loss.detach(), out.sft_loss, out.kl_loss, h.grad, W.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_num_items_in_batch_accumulates_to_one_batch(fused, device):
    # k micro-batches, each normalised by the step's valid-token count, add up to the gradient of the whole batch
    hidden, weight, labels, weights, ref = make_batch(6, 9, 12, 53, device, seed=2, dtype=torch.float64)
    labels[4] = IGNORE  # a micro-batch row with no valid token at all
    loss_fn = DSSLoss(kl_coef=0.5, fused=fused)

    def run(h, W, sl, **kw):
        kwargs = dict(hidden=h, lm_head_weight=W) if fused else dict(logits=h @ W.T)
        return loss_fn(labels=labels[sl], weights=weights[sl], ref_logprobs=ref[sl], **kwargs, **kw)

    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    whole = run(h, W, slice(None))
    whole.loss.backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    n_step = whole.num_tokens.clone()  # transformers passes a tensor
    total, parts = 0.0, 0
    W.grad = None
    gh_acc = torch.zeros_like(hidden)
    for sl in (slice(0, 2), slice(2, 5), slice(5, 6)):
        hs = hidden[sl].clone().requires_grad_()
        out = run(hs, W, sl, num_items_in_batch=n_step)
        out.loss.backward()
        gh_acc[sl] = hs.grad
        total = total + out.loss.detach()
        parts += out.num_tokens
    assert parts == whole.num_tokens
    torch.testing.assert_close(total, whole.loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gh_acc, gh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(W.grad, gW, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_sft_is_mean_cross_entropy(fused, device):
    hidden, weight, labels, _, _ = make_batch(3, 8, 16, 41, device, seed=3)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kwargs = dict(hidden=h, lm_head_weight=W) if fused else dict(logits=h @ W.T)
    out = DSSLoss(kl_coef=0.0, fused=fused)(labels=labels, weights=sft_weights(labels), **kwargs)
    out.loss.backward()
    h2, W2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce = F.cross_entropy((h2 @ W2.T).reshape(-1, 41), labels.reshape(-1), ignore_index=IGNORE)
    ce.backward()
    torch.testing.assert_close(out.loss, ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-5, atol=1e-7)
    assert out.kl_loss.item() == 0.0 and out.mean_weight.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_rejection_sampling_with_zero_weights_keeps_whole_examples(device):
    # the old RS (safeshape train --loss rs --rs-keep-rejected): rejected rows weigh 0, N counts all rows
    hidden, weight, labels, _, _ = make_batch(4, 8, 16, 41, device, seed=4)
    keep = torch.tensor([True, False, True, False], device=device)
    w = rs_weights(labels, keep)
    assert w.shape == labels.shape and (w[1] == 0).all() and (w[2] == 1).all()
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = DSSLoss(kl_coef=0.0)(labels=labels, weights=w, hidden=h, lm_head_weight=W)
    out.loss.backward()
    # cross-entropy summed over the kept examples' tokens, divided by ALL valid tokens
    logits = (hidden @ weight.T)[keep].reshape(-1, 41)
    ce_sum = F.cross_entropy(logits, labels[keep].reshape(-1), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(out.loss, ce_sum / int((labels != IGNORE).sum()), rtol=1e-6, atol=0)
    assert (h.grad[~keep] == 0).all() and (h.grad[keep] != 0).any()
    with pytest.raises(ValueError, match="keep must have shape"):
        rs_weights(labels, keep[:3])


@pytest.mark.parametrize("device", DEVICES)
def test_full_kl(device):
    hidden, weight, labels, weights, _ = make_batch(2, 9, 8, 37, device, seed=5)
    logits = (hidden @ weight.T).requires_grad_()
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(device)
    ref_logits = logits.detach() + 0.3 * noise
    out = DSSLoss(kl_coef=0.5, kl="full", fused=False)(labels=labels, weights=weights, logits=logits,
                                                        ref_logits=ref_logits)
    out.loss.backward()
    z = logits.detach().double().requires_grad_()
    lp, kl = reference.full_kl(z.reshape(-1, 37), ref_logits.double().reshape(-1, 37), labels.reshape(-1))
    w = weights.reshape(-1).double()
    per_token = w * -lp + 0.5 * (1 - w) * kl
    want = per_token.sum() / out.num_tokens
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad.double(), z.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.sft_loss + out.kl_loss, out.loss.detach(), rtol=1e-6, atol=1e-7)
    assert out.kl_loss.item() > 0


def test_configuration_errors():
    with pytest.raises(ValueError, match="kl='full'.*fused=False"):
        DSSLoss(kl="full")
    with pytest.raises(ValueError, match="kl must be"):
        DSSLoss(kl="k3")
    hidden, weight, labels, weights, _ = make_batch(2, 6, 8, 20, "cpu")
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        DSSLoss(0.5)(labels=labels, weights=weights, hidden=hidden, lm_head_weight=weight)
    with pytest.raises(ValueError, match="pass hidden and lm_head_weight"):
        DSSLoss(0.0)(labels=labels, weights=weights, logits=hidden @ weight.T)
    with pytest.raises(ValueError, match="weights has 3 elements"):
        DSSLoss(0.0)(labels=labels, weights=weights[0, :3], hidden=hidden, lm_head_weight=weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_all_tokens_ignored(fused, device):
    hidden, weight, labels, weights, ref = make_batch(2, 5, 8, 20, device)
    labels[:] = IGNORE
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kwargs = dict(hidden=h, lm_head_weight=W) if fused else dict(logits=h @ W.T)
    out = DSSLoss(0.5, fused=fused)(labels=labels, weights=weights, ref_logprobs=ref, **kwargs)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_tokens == 0 and out.mean_weight.item() == 0.0
    assert (h.grad == 0).all() and (W.grad == 0).all()


def test_num_items_in_batch_zero_gives_zero_loss_not_nan():
    from safeshape.loss import DSSLoss

    logits = torch.randn(4, 7, requires_grad=True)
    labels = torch.full((4,), -100)
    for n in (0, torch.tensor(0)):
        out = DSSLoss(kl_coef=0.5, fused=False)(labels=labels, weights=torch.ones(4), ref_logprobs=torch.zeros(4),
                                                logits=logits, num_items_in_batch=n)
        assert out.loss.item() == 0.0
        out.loss.backward()
        assert torch.count_nonzero(logits.grad) == 0
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0"):
        DSSLoss(fused=False)(labels=labels, weights=torch.ones(4), ref_logprobs=torch.zeros(4), logits=logits,
                             num_items_in_batch=-3)


# ---- Deep Token (docs/math.md#deep-token) -------------------------------------------------------------------------------------

def deep_token_ref(hidden, weight, labels, ref, betas, denom=None):
    positions = response_positions(labels)
    per_token = reference.fused_linear_token_loss(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                                  "deep_token", betas, ref_logprobs=ref.reshape(-1),
                                                  positions=positions.reshape(-1))
    return per_token.sum() / (denom if denom is not None else int((labels != IGNORE).sum()))


def test_response_positions_count_from_the_first_response_token():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 7, IGNORE], [IGNORE, 3, 4, IGNORE, IGNORE, IGNORE],
                           [1, 2, 3, 4, 5, 6]])
    assert response_positions(labels).tolist() == [[0, 0, 1, 2, 3, 0], [0, 1, 2, 0, 0, 0], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_deep_token_value_and_gradients(fused, device):
    hidden, weight, labels, _, ref = make_batch(3, 14, 16, 97, device, seed=7)
    betas = (0.5, 2.0, 2.0, 2.0, 2.0, 0.1)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_fn = DeepTokenLoss(fused=fused, chunk_rows=5)
    kwargs = dict(hidden=h, lm_head_weight=W) if fused else dict(logits=h @ W.T)
    out = loss_fn(labels=labels, ref_logprobs=ref, positions=response_positions(labels), **kwargs)
    out.loss.backward()
    h2, W2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = deep_token_ref(h2, W2, labels, ref, betas)
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad.double(), h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W.grad.double(), W2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.sft_loss + out.kl_loss, out.loss.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_deep_token_micro_batches_accumulate_to_one_batch(fused, device):
    hidden, weight, labels, _, ref = make_batch(5, 9, 12, 53, device, seed=8, dtype=torch.float64)
    labels[3] = IGNORE
    positions = response_positions(labels)
    loss_fn = DeepTokenLoss(betas=(0.3, 1.5, 0.05), fused=fused)

    def run(h, W, sl, **kw):
        kwargs = dict(hidden=h, lm_head_weight=W) if fused else dict(logits=h @ W.T)
        return loss_fn(labels=labels[sl], ref_logprobs=ref[sl], positions=positions[sl], **kwargs, **kw)

    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    whole = run(h, W, slice(None))
    whole.loss.backward()
    gh, gW = h.grad.clone(), W.grad.clone()
    W.grad = None
    gh_acc = torch.zeros_like(hidden)
    total = 0.0
    for sl in (slice(0, 2), slice(2, 4), slice(4, 5)):
        hs = hidden[sl].clone().requires_grad_()
        out = run(hs, W, sl, num_items_in_batch=whole.num_tokens)
        out.loss.backward()
        gh_acc[sl] = hs.grad
        total = total + out.loss.detach()
    torch.testing.assert_close(total, whole.loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(gh_acc, gh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(W.grad, gW, rtol=1e-10, atol=1e-14)


def test_deep_token_configuration_errors():
    with pytest.raises(ValueError, match="betas must be"):
        DeepTokenLoss(betas=())
    with pytest.raises(ValueError, match="betas must be"):
        DeepTokenLoss(betas=(0.5, -1.0))


@pytest.mark.parametrize("loss_fn", [DSSLoss(0.5), DeepTokenLoss()])
def test_no_grad_weight_buffer_under_no_grad(loss_fn):
    # issue 10 item 17: under torch.no_grad() the fused loss must not form a [V, H] lm-head gradient (nor a
    # [N, H] hidden one), even though the lm_head requires grad
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, labels, weights, ref = make_batch(2, 6, 8, 40, "cpu", seed=9)
    W = weight.clone().requires_grad_()
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and func.namespace == "safeshape":
                    shapes.append(tuple(o.shape))
            return out

    kw = dict(positions=response_positions(labels)) if isinstance(loss_fn, DeepTokenLoss) else dict(weights=weights)
    with torch.no_grad(), Record():
        out = loss_fn(labels=labels, ref_logprobs=ref, hidden=hidden, lm_head_weight=W, **kw)
    assert torch.isfinite(out.loss) and not out.loss.requires_grad
    assert shapes and tuple(W.shape) not in shapes and (12, 8) not in shapes
