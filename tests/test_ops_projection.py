"""project_lora_b, lora_cosine and alignment_projection_matrix against the plain-torch reference and an fp64
evaluation of docs/math.md#safe-lora-projection."""
import pytest
import torch

from safeshape import ops, reference
from tests.conftest import DEVICES

SHAPES = [(64, 64), (96, 40), (40, 96), (256, 256), (300, 77), (77, 1030)]  # square, tall, wide, odd sizes
RANKS = [1, 4, 8, 16, 33, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_module(d_out, d_in, r, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g)
    aligned = base + 0.05 * torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, r, generator=g) * 0.1
    a = torch.randn(r, d_in, generator=g) * 0.1
    return [t.to(dtype).to(device) for t in (aligned, base, b, a)]


def fp64_projection(aligned, base, lora_b):
    v = aligned.double() - base.double()
    norm = torch.linalg.vector_norm(v)
    return (v @ (v.T @ lora_b.double())) / norm, norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_lora_b_matches_fp64(shape, r, dtype, device):
    aligned, base, b, a = make_module(*shape, r, dtype, device)
    got, v_norm = ops.project_lora_b(aligned, base, b)
    assert got.dtype == dtype and got.shape == b.shape and v_norm.dtype == torch.float32
    want, want_norm = fp64_projection(aligned, base, b)
    rel = ((got.double() - want).norm() / want.norm()).item()
    # fp32 output: the issue's 1e-5; bf16/fp16 outputs are limited by their own rounding of B'
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert rel <= tol, rel
    assert abs(v_norm.item() - want_norm.item()) <= 1e-5 * want_norm.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_lora_b_matches_reference(dtype, device):
    aligned, base, b, _ = make_module(128, 96, 8, dtype, device, seed=3)
    got, n = ops.project_lora_b(aligned, base, b)
    want, wn = reference.project_lora_b(aligned, base, b)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-4)
    torch.testing.assert_close(n, wn, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_cosine_matches_fp64(shape, r, dtype, device):
    aligned, base, b, a = make_module(*shape, r, dtype, device, seed=1)
    p, _ = ops.project_lora_b(aligned, base, b)
    got = ops.lora_cosine(b, p, a)
    assert got.dtype == torch.float64 and got.dim() == 0
    want = reference.lora_cosine(b, p, a, compute_dtype=torch.float64)
    assert abs(got.item() - want.item()) <= 1e-6
    assert 0.0 <= got.item() <= 1.0


def test_cosine_gram_form_beats_direct_fp32():
    # docs/math.md#safe-lora-without-forming-c: a direct fp32 cosine is off by ~1e-3 at scale, the Gram form by
    # ~1e-8; check the Gram form at 1e-9.
    aligned, base, b, a = make_module(1024, 1024, 16, torch.float32, "cpu", seed=2)
    p, _ = ops.project_lora_b(aligned, base, b)
    exact = reference.lora_cosine(b, p, a, compute_dtype=torch.float64).item()
    assert abs(ops.lora_cosine(b, p, a).item() - exact) <= 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_edge_cases(device):
    aligned, base, b, a = make_module(32, 24, 4, torch.float32, device)
    zero_b = torch.zeros_like(b)
    p, _ = ops.project_lora_b(aligned, base, zero_b)
    assert ops.lora_cosine(zero_b, p, a).item() == 0.0  # dW = 0 -> 0 by definition
    # V = 0: the projection is zero and so is the cosine
    p0, n0 = ops.project_lora_b(base, base, b)
    assert n0.item() == 0.0 and torch.count_nonzero(p0) == 0
    assert ops.lora_cosine(b, p0, a).item() == 0.0
    # dW inside the subspace spanned by V's columns: C dW is parallel to dW iff dW is an eigen-direction;
    # a rank-1 V with dW = v u^T gives cos = 1.
    u = torch.randn(24, device=device)
    v = torch.randn(32, device=device)
    aligned1 = base + torch.outer(v, u)
    b1 = v[:, None].clone()
    a1 = torch.randn(1, 24, device=device)
    p1, _ = ops.project_lora_b(aligned1, base, b1)
    assert ops.lora_cosine(b1, p1, a1).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_projection_matrix(dtype, device):
    aligned, base, b, _ = make_module(80, 50, 4, dtype, device)
    c = ops.alignment_projection_matrix(aligned, base)
    want = reference.alignment_projection_matrix(aligned, base, compute_dtype=torch.float64)
    assert c.dtype == torch.float32 and c.shape == (80, 80)
    torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-5)
    # C is PSD and not idempotent (docs/math.md#safe-lora-projection): C B equals the projection op's result
    p, _ = ops.project_lora_b(aligned, base, b)
    torch.testing.assert_close((c @ b.float()), p.float(), rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-4)


def test_bad_inputs_name_the_argument():
    aligned, base, b, a = make_module(16, 8, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="aligned and base must have the same shape"):
        ops.project_lora_b(aligned, base[:, :4], b)
    with pytest.raises(RuntimeError, match="lora_b has 3 rows"):
        ops.project_lora_b(aligned, base, b[:3])
    with pytest.raises(RuntimeError, match="aligned must be float32, bfloat16 or float16"):
        ops.project_lora_b(aligned.double(), base.double(), b)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.project_lora_b(aligned, base.half(), b)
    with pytest.raises(RuntimeError, match="lora_a has 3 rows but lora_b has rank 2"):
        ops.lora_cosine(b, b, a[:1].expand(3, 8))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops.project_lora_b(aligned[None], base[None], b)


def test_noncontiguous_inputs():
    aligned, base, b, a = make_module(48, 40, 4, torch.float32, "cpu")
    got, _ = ops.project_lora_b(aligned.T.contiguous().T, base.T.contiguous().T, b.T.contiguous().T)
    want, _ = ops.project_lora_b(aligned, base, b)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    aligned, base, b, a = make_module(40, 24, 4, dtype, device)
    torch.library.opcheck(torch.ops.safeshape.project_lora_b.default, (aligned, base, b))
    p, _ = ops.project_lora_b(aligned, base, b)
    torch.library.opcheck(torch.ops.safeshape.lora_cosine.default, (b, p, a))
    torch.library.opcheck(torch.ops.safeshape.alignment_projection_matrix.default, (aligned, base))


def hard_module(d_out, d_in, r, share=1e-6, ratio=1e3, k2=8, seed=0):
    """A module where float32 accumulation of V^T B fails: V has one singular value `ratio` times the next k2,
    lora_B lies in those next directions with `share` of its norm in V's top left-singular direction. Then
    C B = sum_i sigma_i^2 u_i (u_i^T B) / ||V|| gets comparable terms from the tiny top component and the rest."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    base = torch.randn(d_out, d_in, **f64) * 0.02
    u, _ = torch.linalg.qr(torch.randn(d_out, k2 + 1, **f64))
    w, _ = torch.linalg.qr(torch.randn(d_in, k2 + 1, **f64))
    s = torch.cat([torch.ones(1, dtype=torch.float64), torch.linspace(1, 0.5, k2, dtype=torch.float64) / ratio])
    aligned = (base + (u * s) @ w.T * 0.2).float()
    b = u[:, 1:] @ torch.randn(k2, r, **f64)
    b += 0.3 * torch.randn(d_out, r, **f64) / d_out**0.5 * b.norm(dim=0)
    b -= torch.outer(u[:, 0], u[:, 0] @ b)
    b += share * b.norm(dim=0) * u[:, :1]
    a = torch.randn(r, d_in, **f64)
    return aligned, base.float(), b.float(), a.float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,seed", [((1024, 1024), 0), ((2048, 512), 1)])
def test_cosine_hard_module_within_1e6_of_fp64(shape, seed, device):
    # issue 14 item 2: with V^T B summed in float32 this module's cosine was off by ~1e-5 (5e-4 on real ones)
    aligned, base, b, a = hard_module(*shape, 16, seed=seed)
    v = aligned.double() - base.double()
    exact = reference.lora_cosine(b, v @ (v.T @ b.double()) / v.norm(), a).item()
    assert 0.2 < exact < 0.8  # the module is hard: the cosine depends on the 1e-6 component
    aligned, base, b, a = (t.to(device) for t in (aligned, base, b, a))
    p, _ = ops.project_lora_b(aligned, base, b)
    assert abs(ops.lora_cosine(b, p, a).item() - exact) <= 1e-6


def exponent_gap_module(col):
    """bfloat16 weights 2^30 apart in column `col`: aligned - base is exact in float64, rounded in float32, and
    V^T B = -2^-30 cancels, so a float32 difference gives B' = 0."""
    aligned = torch.zeros(2, 64, dtype=torch.bfloat16)
    base = torch.zeros(2, 64, dtype=torch.bfloat16)
    aligned[0, col], base[0, col], base[1, col] = 1.0, 2.0 ** -30, 1.0
    return aligned, base, torch.ones(2, 1, dtype=torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("col", [0, 63])
def test_bf16_difference_is_exact(col, device):
    aligned, base, b = exponent_gap_module(col)
    want, _ = fp64_projection(aligned, base, b)
    got, _ = ops.project_lora_b(aligned.to(device), base.to(device), b.to(device))
    torch.testing.assert_close(got.cpu().double(), want, rtol=8e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["aligned", "base", "lora_b", "lora_a"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(where, value, device):
    # issue 10 item 3: a NaN/Inf anywhere must not come out as a finite cosine (it was 0: "project this module")
    aligned, base, b, a = make_module(32, 24, 4, torch.float32, device)
    {"aligned": aligned, "base": base, "lora_b": b, "lora_a": a}[where][1, 2] = value
    p, n = ops.project_lora_b(aligned, base, b)
    if where != "lora_a":
        assert not torch.isfinite(p).all()
    cos = ops.lora_cosine(b, p, a)
    assert torch.isnan(cos), cos


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_out,d_in", [(0, 16), (16, 0), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_size_zero_shapes(d_out, d_in, dtype, device):
    # issue 10 item 15: empty weights are an empty V: ||V|| = 0, B' = 0, cosine 0, on every device
    aligned = torch.randn(d_out, d_in).to(dtype).to(device)
    base = torch.randn(d_out, d_in).to(dtype).to(device)
    b = torch.randn(d_out, 3).to(dtype).to(device)
    a = torch.randn(3, d_in).to(dtype).to(device)
    p, n = ops.project_lora_b(aligned, base, b)
    assert p.shape == (d_out, 3) and p.dtype == dtype and n.item() == 0.0
    assert torch.count_nonzero(p) == 0
    assert ops.lora_cosine(b, p, a).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_rank_zero(device):
    # r = 0 is refused by project_lora_b on every device (shared check); lora_cosine of an empty update is 0
    aligned, base, b, a = make_module(16, 8, 2, torch.float32, device)
    with pytest.raises(RuntimeError, match="rank >= 1"):
        ops.project_lora_b(aligned, base, b[:, :0])
    assert ops.lora_cosine(b[:, :0], b[:, :0], a[:0]).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,r", [((130, 70), 65), ((300, 40), 96), ((333, 129), 130), ((517, 260), 16),
                                     ((1024, 200), 8)])
def test_large_rank_and_rows(shape, r, device):
    # issue 14 item 4: r > 64 (CUDA gridDim.z > 1), d_out > 300 and d_out not a multiple of the rows per block
    aligned, base, b, a = make_module(*shape, r, torch.float32, device, seed=5)
    got, _ = ops.project_lora_b(aligned, base, b)
    want, _ = fp64_projection(aligned, base, b)
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5


def misaligned(t):
    """The same values in a buffer that starts one element past an aligned allocation (contiguous)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_inputs(dtype, device):
    aligned, base, b, a = make_module(77, 45, 5, dtype, device, seed=6)
    want, wn = ops.project_lora_b(aligned, base, b)
    got, gn = ops.project_lora_b(misaligned(aligned), misaligned(base), misaligned(b))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert gn.item() == wn.item()
    assert ops.lora_cosine(misaligned(b), misaligned(got), misaligned(a)).item() == ops.lora_cosine(b, want, a).item()


ISA_CHECK = """
import torch, safeshape
from safeshape import ops, reference
from tests.test_ops_projection import make_module, hard_module, fp64_projection, exponent_gap_module
print(safeshape.build_info()['cpu_isa'])
worst = {'threads_differ': 0}
for shape in [(300, 77), (77, 1030), (1100, 40), (64, 2100), (17, 9)]:
    for r in [1, 8, 12, 16, 33, 64]:
        for dtype in [torch.float32, torch.bfloat16, torch.float16]:
            al, ba, b, a = make_module(*shape, r, dtype, 'cpu', seed=4)
            w, wn = fp64_projection(al, ba, b)
            # one thread reads whole rows in pass 1, two threads column chunks: same sums in the same order
            results = []
            for threads in [1, 2]:
                torch.set_num_threads(threads)
                p, n = ops.project_lora_b(al, ba, b)
                results.append((p, n))
                rel = ((p.double() - w).norm() / w.norm()).item()
                key = str(dtype)
                worst[key] = max(worst.get(key, 0.0), rel, abs(n.item() - wn.item()) / wn.item())
            worst['threads_differ'] += int(not (torch.equal(results[0][0], results[1][0])
                                                 and torch.equal(results[0][1], results[1][1])))
for col in [0, 63]:
    al, ba, b = exponent_gap_module(col)
    w, _ = fp64_projection(al, ba, b)
    p, _ = ops.project_lora_b(al, ba, b)
    worst['bf16_exponent_gap'] = max(worst.get('bf16_exponent_gap', 0.0),
                                     ((p.double() - w).norm() / w.norm()).item())
al, ba, b, a = hard_module(1024, 1024, 16, seed=0)
v = al.double() - ba.double()
exact = reference.lora_cosine(b, v @ (v.T @ b.double()) / v.norm(), a).item()
for threads in [1, 2]:
    torch.set_num_threads(threads)
    p, _ = ops.project_lora_b(al, ba, b)
    worst['hard_cosine'] = max(worst.get('hard_cosine', 0.0), abs(ops.lora_cosine(b, p, a).item() - exact))
print(repr(worst))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_isa_path_agrees(isa):
    # SAFESHAPE_ISA forces a code path (read once per process, so each path runs in a child): each path's kernels
    # (their register blocking, vector tails and dtype loads differ) against fp64, and the hard module's cosine;
    # at 1 and 2 threads (pass 1 reads whole rows on one thread), with bit-identical results
    import ast
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SAFESHAPE_ISA=isa, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, capture_output=True, text=True)
    if run.returncode != 0 and "does not support" in run.stderr:
        pytest.skip(f"this CPU has no {isa}")
    assert run.returncode == 0, run.stderr[-2000:]
    got_isa, worst = run.stdout.split("\n", 1)
    worst = ast.literal_eval(worst.strip())
    assert got_isa == isa
    assert worst["torch.float32"] <= 1e-5, worst
    assert worst["torch.bfloat16"] <= 8e-3 and worst["torch.float16"] <= 1e-3, worst
    assert worst["hard_cosine"] <= 1e-6, worst
    assert worst["threads_differ"] == 0, worst
    assert worst["bf16_exponent_gap"] <= 8e-3, worst


def test_unknown_isa_is_an_error():
    import os
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", "import safeshape; safeshape.build_info()"],
                         env=dict(os.environ, SAFESHAPE_ISA="avx9"), capture_output=True, text=True)
    assert run.returncode != 0 and "SAFESHAPE_ISA=avx9: expected avx512, avx2 or generic" in run.stderr
