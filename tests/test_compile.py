"""Every op works under torch.compile(fullgraph=True) and gives the eager results (forward and, for the losses,
backward)."""
import pytest
import torch

from safeshape import ops


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_projection_ops():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=g)
    aligned = base + 0.1 * torch.randn(48, 40, generator=g)
    b, a = torch.randn(48, 4, generator=g), torch.randn(4, 40, generator=g)

    def f(aligned, base, b, a):
        p, n = ops.project_lora_b(aligned, base, b)
        c = ops.alignment_projection_matrix(aligned, base)
        return p * 2, n, ops.lora_cosine(b, p, a), c.sum()

    eager = f(aligned, base, b, a)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")(aligned, base, b, a)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)


def _loss_inputs(n=10, v=37, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -100
    w = torch.rand(n, generator=g, dtype=torch.float64)
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * 4
    ref_logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3
    upstream = torch.rand(n, generator=g, dtype=torch.float64)  # a different gradient per token
    return logits, labels, w, ref, ref_logits, hidden, weight, upstream


def _losses(logits, labels, w, ref, ref_logits, hidden, weight, upstream):
    positions = torch.arange(1, labels.shape[0] + 1) % 4 + 1
    out = [
        ops.token_objective(ops.token_logprobs(logits, labels), labels, "dss_k2", [0.5], weights=w, ref_logprobs=ref),
        ops.token_logprobs(logits, labels),
        sum(ops.full_kl(logits, ref_logits, labels)),
        ops.fused_linear_token_loss(hidden, weight, labels, "dss_k2", [0.5], weights=w, ref_logprobs=ref)[0],
        ops.fused_linear_token_loss(hidden, weight, labels, "deep_token", [0.5, 2.0, 0.1], ref_logprobs=ref,
                                    positions=positions)[0],
        ops.fused_linear_token_logprobs(hidden, weight, labels),
    ]
    return sum((o * upstream).sum() for o in out), out


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_losses_forward_and_backward(backend):
    def run(fn):
        x = [t.clone().requires_grad_(t.is_floating_point() and i in (0, 5, 6)) for i, t in enumerate(_loss_inputs())]
        total, outs = fn(*x)
        total.backward()
        return [o.detach() for o in outs] + [x[0].grad, x[5].grad, x[6].grad]

    eager = run(_losses)
    compiled = run(torch.compile(_losses, fullgraph=True, backend=backend))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_compile_star_token_weights():
    values = torch.rand(2, 4)
    ends = torch.tensor([[3, 7, 9, -1], [2, 4, 6, 10]])

    def f(values, ends):
        return ops.star_token_weights(values, ends, 12) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(values, ends), f(values, ends))


@pytest.mark.parametrize("name", ["dss", "deep_token"])
def test_compile_loss_modules(name):
    from safeshape.loss import DeepTokenLoss, DSSLoss

    logits, labels, w, ref, _, hidden, weight, _ = _loss_inputs(seed=1)
    positions = torch.arange(1, labels.shape[0] + 1) % 7 + 1
    kw = dict(weights=w) if name == "dss" else dict(positions=positions)
    for fused in (False, True):
        mod = DSSLoss(kl_coef=0.5, fused=fused) if name == "dss" else DeepTokenLoss(fused=fused)

        def f(hidden, weight, logits):
            if fused:
                return mod(labels=labels, ref_logprobs=ref, hidden=hidden, lm_head_weight=weight, **kw).loss
            return mod(labels=labels, ref_logprobs=ref, logits=logits, **kw).loss

        def run(fn):
            x = [t.clone().requires_grad_() for t in (hidden, weight, logits)]
            loss = fn(*x)
            loss.backward()
            return [loss.detach()] + [t.grad for t in x if t.grad is not None]

        for a, b in zip(run(f), run(torch.compile(f, fullgraph=True, backend="aot_eager"))):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_compile_reduce_overhead_cuda():
    # no host sync in the loss (labels are not read back, N stays a tensor): CUDA graphs can capture a train step
    from safeshape.loss import DeepTokenLoss, DSSLoss

    logits, labels, w, ref, _, hidden, weight, _ = [t.cuda() for t in _loss_inputs(seed=2)]
    hidden, weight = hidden.float(), weight.float()
    positions = torch.arange(1, labels.shape[0] + 1, device="cuda") % 7 + 1
    for mod, kw in ((DSSLoss(0.5), dict(weights=w)), (DeepTokenLoss(), dict(positions=positions))):
        def step(hidden, weight):
            out = mod(labels=labels, ref_logprobs=ref, hidden=hidden, lm_head_weight=weight, **kw)
            return out.loss

        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = compiled(h, W)
            loss.backward()
        h2, W2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        want = step(h2, W2)
        want.backward()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(h.grad, h2.grad)
