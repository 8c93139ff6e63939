"""star_token_weights against its plain-torch reference and a literal reading of its definition
(docs/math.md#star-token-weights)."""
import pytest
import torch

from safeshape import ops, reference
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def literal(values, chunk_ends, seq_len):
    """The definition, one token at a time: chunk k's value on [previous end, its end); -1 = padding; else 0."""
    B, K = values.shape
    out = torch.zeros(B, seq_len, dtype=values.dtype)
    for b in range(B):
        for t in range(seq_len):
            prev = 0
            for k in range(K):
                end = int(chunk_ends[b, k])
                if end < 0:
                    continue
                if prev <= t < end:
                    out[b, t] = values[b, k]
                    break
                prev = max(prev, end)
    return out


def random_case(B, K, L, dtype, seed, monotone=True, pad_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(B, K, generator=g).to(dtype)
    if monotone:
        ends = torch.sort(torch.randint(0, L + 3, (B, K), generator=g), dim=1).values
    else:
        ends = torch.randint(-1, L + 3, (B, K), generator=g)
    pad = torch.rand(B, K, generator=g) < pad_frac
    # padding chunks: trailing ones (the usual layout) and a few anywhere
    ends = torch.where(pad, torch.full_like(ends, -1), ends)
    return values, ends


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 17), (3, 40, 300), (4, 7, 5), (1, 3, 9000), (5, 300, 700)])
@pytest.mark.parametrize("monotone", [True, False])
def test_matches_reference(shape, dtype, device, monotone):
    B, K, L = shape
    values, ends = random_case(B, K, L, dtype, seed=B * 1000 + K + L, monotone=monotone)
    got = ops.star_token_weights(values.to(device), ends.to(device), L)
    want = reference.star_token_weights(values, ends, L)
    assert got.dtype == dtype and got.shape == (B, L) and got.device.type == device
    assert torch.equal(got.cpu(), want)  # a copy of values: bit-exact


@pytest.mark.parametrize("seed", range(6))
def test_reference_matches_literal_definition(seed):
    values, ends = random_case(3, 6, 23, torch.float32, seed, monotone=seed % 2 == 0)
    torch.testing.assert_close(reference.star_token_weights(values, ends, 23), literal(values, ends, 23), rtol=0,
                               atol=0)
    torch.testing.assert_close(ops.star_token_weights(values, ends, 23), literal(values, ends, 23), rtol=0, atol=0)


def test_worked_example():
    values = torch.tensor([[0.5, 0.25, 1.0, 7.0], [2.0, 3.0, 4.0, 5.0]])
    ends = torch.tensor([[2, 5, 5, 8], [3, -1, 1, -1]])
    got = ops.star_token_weights(values, ends, 10)
    want = torch.tensor([[0.5, 0.5, 0.25, 0.25, 0.25, 7.0, 7.0, 7.0, 0.0, 0.0],
                         [2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_shapes_and_int32_ends(device):
    v = torch.rand(3, 0, device=device)
    assert torch.equal(ops.star_token_weights(v, torch.zeros(3, 0, dtype=torch.long, device=device), 4),
                       torch.zeros(3, 4, device=device))
    v = torch.rand(2, 3, device=device)
    e = torch.tensor([[1, 2, 3], [3, -1, -1]], device=device)
    assert ops.star_token_weights(v, e, 0).shape == (2, 0)
    assert torch.equal(ops.star_token_weights(v, e.int(), 5), ops.star_token_weights(v, e, 5))
    assert ops.star_token_weights(torch.rand(0, 3, device=device), torch.zeros(0, 3, dtype=torch.long,
                                                                               device=device), 5).shape == (0, 5)
    # non-contiguous inputs
    vt, et = torch.rand(3, 2, device=device).t(), torch.tensor([[1, 4], [2, 6], [3, 9]], device=device).t()
    torch.testing.assert_close(ops.star_token_weights(vt, et, 10),
                               reference.star_token_weights(vt.contiguous(), et.contiguous(), 10))


def test_bad_arguments_name_the_argument():
    v = torch.rand(2, 3)
    e = torch.tensor([[1, 2, 3], [1, 2, 3]])
    with pytest.raises(RuntimeError, match="star_token_weights: values must be 2-D"):
        ops.star_token_weights(v[0], e[0], 4)
    with pytest.raises(RuntimeError, match="star_token_weights: chunk_ends must have the shape"):
        ops.star_token_weights(v, e[:, :2], 4)
    with pytest.raises(RuntimeError, match="star_token_weights: chunk_ends must be int64 or int32"):
        ops.star_token_weights(v, e.float(), 4)
    with pytest.raises(RuntimeError, match="star_token_weights: values must be a floating-point"):
        ops.star_token_weights(e, e, 4)
    with pytest.raises(RuntimeError, match="star_token_weights: seq_len must be >= 0"):
        ops.star_token_weights(v, e, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    values, ends = random_case(3, 8, 50, dtype, seed=7)
    torch.library.opcheck(torch.ops.safeshape.star_token_weights.default, (values.to(device), ends.to(device), 50))
