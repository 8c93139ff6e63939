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
    out = [
        ops.dss_loss(logits, labels, w, ref, 0.5),
        ops.token_logprobs(logits, labels),
        ops.dss_loss_full_kl(logits, labels, w, ref_logits, 0.5),
        ops.fused_linear_dss_loss(hidden, weight, labels, w, ref, 0.5),
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


def test_compile_dss_loss_module():
    from safeshape.loss import DSSLoss

    logits, labels, w, ref, _, hidden, weight, _ = _loss_inputs(seed=1)
    for fused in (False, True):
        mod = DSSLoss(kl_coef=0.5, fused=fused)

        def f(hidden, weight, logits):
            if fused:
                return mod(labels=labels, weights=w, ref_logprobs=ref, hidden=hidden, lm_head_weight=weight).loss
            return mod(labels=labels, weights=w, ref_logprobs=ref, logits=logits).loss

        def run(fn):
            x = [t.clone().requires_grad_() for t in (hidden, weight, logits)]
            loss = fn(*x)
            loss.backward()
            return [loss.detach()] + [t.grad for t in x if t.grad is not None]

        for a, b in zip(run(f), run(torch.compile(f, fullgraph=True, backend="aot_eager"))):
            torch.testing.assert_close(a, b)
