"""The CUDA kernels (cuda/*.cu) and their glue (cpp/*_cuda.cpp) under CPU emulation (docs/cuda-emulation.md),
compared with the CPU ops on the cases where they could differ: NaN, +-inf and ignored rows, rows whose storage
starts at an offset (unaligned vector heads), every dtype; and issue 22's bugs and risks, each with a case that
failed before its fix. The device-parametrised tests of the other modules run under emulation too (their
``cuda_emu`` cases, tests/conftest.py)."""
import ctypes
import math

import pytest
import torch

from tests import cuda_emu
from tests.conftest import _EMU_MISSING

pytestmark = pytest.mark.skipif(bool(_EMU_MISSING), reason=str(_EMU_MISSING))

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INF = float("inf")
NAN = float("nan")
ops = torch.ops.safeshape


def emu():
    cuda_emu.library()
    return torch.ops.safeshape_cuda_emu


def same(got, want, rtol, atol=0.0):
    """Equal NaN patterns and infinities, close elsewhere."""
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    fin = want.isfinite()
    assert torch.equal(got[~fin & ~want.isnan()], want[~fin & ~want.isnan()]), (got, want)
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=atol)


def special_rows(dtype, vocab=37, seed=0, offset=0):
    """Rows of random logits, then rows with NaN, -inf, +inf, all -inf, only NaN and -inf, one finite value;
    labels with ignored rows. offset > 0: the rows start that many elements into their storage."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(12, vocab, generator=g, dtype=torch.float64) * 3
    z[4, 5 % vocab] = NAN
    z[5, :vocab // 2] = -INF
    z[6, 3 % vocab] = INF
    z[7, :] = -INF
    z[8, :] = -INF
    z[8, vocab - 1] = NAN  # a thread holding only NaN and -inf (issue 22 bug 1)
    z[9, :] = -INF
    z[9, 2 % vocab] = 1.5
    labels = torch.randint(0, vocab, (12,), generator=g)
    labels[[1, 10]] = IGNORE
    labels[9] = 2 % vocab
    z = z.to(dtype)
    if offset:
        flat = torch.empty(z.numel() + offset, dtype=dtype)
        flat[offset:] = z.flatten()
        z = flat[offset:].view(z.shape)
        assert z.storage_offset() == offset
    return z, labels


LOSS_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("vocab", [1, 37, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_rows_match_cpu(dtype, vocab, offset):
    z, labels = special_rows(dtype, vocab, seed=vocab + offset, offset=offset)
    lp_e, lse_e = emu().token_logprobs(z, labels, IGNORE)
    lp_c, lse_c = ops.token_logprobs(z, labels, IGNORE)
    same(lp_e, lp_c, LOSS_RTOL[dtype], 1e-6)
    same(lse_e, lse_c, LOSS_RTOL[dtype], 1e-6)
    g = torch.randn(z.shape[0], dtype=lp_c.dtype, generator=torch.Generator().manual_seed(1))
    ge, gc = z.clone(), z.clone()
    emu().token_logprobs_backward_(ge, g, labels, lse_c, IGNORE)
    ops.token_logprobs_backward_(gc, g, labels, lse_c, IGNORE)
    same(ge, gc, GRAD_RTOL[dtype], 1e-6)


@pytest.mark.parametrize("offset", [0, 2])
@pytest.mark.parametrize("vocab", [1, 37, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_kl_rows_match_cpu(dtype, vocab, offset):
    z, labels = special_rows(dtype, vocab, seed=vocab, offset=offset)
    r, _ = special_rows(dtype, vocab, seed=vocab + 7, offset=offset)
    r[5] = torch.randn(vocab).to(dtype)  # a finite reference where the policy has -inf (p = 0 terms)
    got = emu().full_kl(z, r, labels, IGNORE)
    want = ops.full_kl(z, r, labels, IGNORE)
    for e, c in zip(got, want):
        same(e, c, LOSS_RTOL[dtype] * 10, 1e-5)
    gen = torch.Generator().manual_seed(2)
    st = want[0].dtype
    g_lp, g_kl = torch.randn(z.shape[0], generator=gen).to(st), torch.randn(z.shape[0], generator=gen).to(st)
    ge = emu().full_kl_backward(g_lp, g_kl, z, r, labels, want[2], want[3], want[1], IGNORE)
    gc = ops.full_kl_backward(g_lp, g_kl, z, r, labels, want[2], want[3], want[1], IGNORE)
    same(ge, gc, GRAD_RTOL[dtype], 1e-5)


def test_bug1_nan_and_minus_inf_thread_keeps_nan():
    # issue 22 bug 1: Lse::merge dropped the NaN of a thread that saw only NaN and -inf (CUDA -1.386 / 1.386)
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0, NAN, -INF, -INF, -INF]])
    lp, lse = emu().token_logprobs(z, torch.tensor([0]), IGNORE)
    assert math.isnan(lp.item()) and math.isnan(lse.item())


def test_bug2_nan_probability_gives_nan_kl():
    # issue 22 bug 2: kl_term's p > 0 test turned a NaN p into 0 (CUDA KL 0.0, CPU NaN)
    z = torch.tensor([[0.0, NAN, 0.0, 0.0]])
    _, kl, _, _ = emu().full_kl(z, torch.zeros(1, 4), torch.tensor([0]), IGNORE)
    assert math.isnan(kl.item())
    assert math.isnan(ops.full_kl(z, torch.zeros(1, 4), torch.tensor([0]), IGNORE)[1].item())


@pytest.mark.parametrize("row", [[-INF] * 5, [INF, 0.0, 1.0, 2.0, 3.0]])
def test_non_finite_row_maximum_gives_nan_lse_as_on_cpu(row):
    # issue 22 risk: an all -inf row gave lse -inf on CUDA (NaN on the CPU); a +inf gave +inf
    z = torch.tensor([row])
    _, lse = emu().token_logprobs(z, torch.tensor([1]), IGNORE)
    _, lse_cpu = ops.token_logprobs(z, torch.tensor([1]), IGNORE)
    assert math.isnan(lse_cpu.item()) and math.isnan(lse.item())


def test_projection_norm_accumulates_in_float64():
    # issue 22 risk: ||V||^2 summed in float32 per thread and per block. 16 row splits of 4 rows (one block each);
    # in each, column 0 holds a 1 and the other 255 columns squares that a float32 butterfly sum onto 1 drops
    # (2 ulp of the float32 norm in all); the CPU sums in float64
    d_out, d_in = 64, 256
    x = 2.1530333469854668e-05
    v = torch.zeros(d_out, d_in, dtype=torch.float64)
    v[:, 1:] = x
    v[::4, 0] = 1.0
    aligned, base = v.float(), torch.zeros(d_out, d_in)
    lora_b = torch.randn(d_out, 8, generator=torch.Generator().manual_seed(0))
    want = ops.project_lora_b(aligned, base, lora_b)
    got = emu().project_lora_b(aligned, base, lora_b)
    exact = aligned.double().norm().item()
    ulp = (torch.nextafter(want[1], torch.tensor(10.0)) - want[1]).item()
    assert abs(want[1].item() - exact) <= ulp
    assert abs(got[1].item() - want[1].item()) <= ulp
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_projection_workspace_is_bounded():
    # issue 22 risk: 8 nsplit d_in r bytes of partial sums, 147 MB at 8192 x 28672, r 64 (590 MB at r 256)
    lib = cuda_emu.capi()
    for d_out, d_in, r in [(8192, 28672, 64), (8192, 28672, 256), (28672, 8192, 64)]:
        partial_cap = 64 << 20
        m_bytes = 4 * d_in * r
        single_split = 8 * d_in * r
        assert lib.emu_project_lora_b_workspace_bytes(d_out, d_in, r) <= max(partial_cap, single_split) + m_bytes + (
            1 << 20)


def test_lora_cosine_rank_over_grid_limit_is_refused_before_launch():
    # issue 22 risk: r x r blocks cast to unsigned unchecked; r = 46341 gives more than 2^31 - 1 blocks
    lib = cuda_emu.capi()
    buf = (ctypes.c_double * 8)()
    before = lib.cuemu_launches()
    rc = lib.emu_lora_cosine(buf, buf, buf, buf, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_int64(46341), buf,
                             ctypes.c_size_t(2 ** 63))
    assert rc == 1 and lib.cuemu_launches() == before  # cudaErrorInvalidValue, nothing launched
    # the glue says so by name, before it allocates 4 r^2 doubles
    b = torch.zeros(1, 46341)
    with pytest.raises(RuntimeError, match="lora_cosine: rank 46341 is above"):
        emu().lora_cosine(b, b, torch.zeros(46341, 1))


def test_star_float8_values_are_named():
    # issue 22 risk: float8 passes is_floating_point and failed on CUDA as "invalid argument"
    v = torch.zeros(2, 3).to(torch.float8_e4m3fn)
    ends = torch.tensor([[1, 2, 3], [1, 2, 3]])
    with pytest.raises(RuntimeError, match="values has an unsupported dtype"):
        ops.star_token_weights(v, ends, 4)
    with pytest.raises(RuntimeError, match="values has an unsupported dtype Float8_e4m3fn"):
        emu().star_token_weights(v, ends, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", ["one_per_token", "unsorted", "padding", "past_the_end", "empty_chunks"])
def test_star_chunk_search_matches_cpu(case, dtype):
    # the tiled search (issue 22 risk: a linear scan per thread): bitwise equal to the CPU on many chunks
    g = torch.Generator().manual_seed(hash(case) % 1000)
    seq = 700
    if case == "one_per_token":
        ends = torch.arange(1, seq + 1).repeat(2, 1)
    elif case == "unsorted":
        ends = torch.randint(0, seq + 50, (3, 600), generator=g)
    elif case == "padding":
        ends = torch.cat([torch.arange(3, seq, 3).repeat(2, 1), torch.full((2, 40), -1)], 1)
    elif case == "past_the_end":
        ends = torch.sort(torch.randint(0, 2 * seq, (2, 520), generator=g), 1).values
    else:
        ends = torch.sort(torch.randint(0, seq, (2, 300), generator=g), 1).values  # repeated ends: empty chunks
    values = torch.randn(ends.shape, generator=g).to(dtype)
    got = emu().star_token_weights(values, ends, seq)
    want = ops.star_token_weights(values, ends, seq)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_emulated_fault_is_a_launch_error():
    # the emulation reports an impossible launch the way CUDA does: the launcher returns the error
    lib = cuda_emu.capi()
    lib.cuemu_set_max_blocks(ctypes.c_long(2))
    try:
        z = torch.randn(5, 7)
        with pytest.raises(RuntimeError, match="token_logprobs: CUDA launch failed"):
            emu().token_logprobs(z, torch.zeros(5, dtype=torch.long), IGNORE)
        assert "more than the emulation runs" in cuda_emu.message()
    finally:
        lib.cuemu_set_max_blocks(ctypes.c_long(1 << 20))
