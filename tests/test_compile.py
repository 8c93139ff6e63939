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
