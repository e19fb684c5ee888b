"""decode_attention over a paged cache: every backend against a per-query loop, on scattered
blocks whose stale entries are NaN; error paths."""

import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run on the CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from attention_cases import loop_attention, paged_case, rotate

from vpt_fast.ops.decode_attention import decode_attention

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads,dim,block_size,lens", [
    (4, 2, 16, 4, [1, 9, 70]),
    (2, 2, 8, 16, [16, 17, 3, 150]),
    (6, 1, 32, 5, [64]),
    (4, 4, 12, 3, [2, 11]),  # a head size that is not a power of two
])
def test_decode_attention_matches_a_loop(backend, heads, kv_heads, dim, block_size, lens):
    g = torch.Generator().manual_seed(heads * dim + block_size)
    k, v, tables, seq_lens = paged_case(lens, block_size, kv_heads, dim, g)
    q = torch.randn(len(lens), heads, dim, generator=g)
    scale = dim**-0.5
    want = loop_attention(q, k, v, tables, seq_lens, scale, [(b, n - 1) for b, n in enumerate(lens)])
    got = decode_attention(q, k, v, tables, seq_lens, scale, backend=backend)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5
    cos, sin = torch.randn(len(lens), dim, generator=g), torch.randn(len(lens), dim, generator=g)
    want = loop_attention(rotate(q, cos, sin), k, v, tables, seq_lens, scale, [(b, n - 1) for b, n in enumerate(lens)])
    got = decode_attention(q, k, v, tables, seq_lens, scale, cos, sin, backend=backend)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention_bf16_error_within_torch_bf16_error(backend):
    g = torch.Generator().manual_seed(7)
    lens = [5, 40, 33]
    k, v, tables, seq_lens = paged_case(lens, 8, 2, 16, g)
    q = torch.randn(3, 4, 16, generator=g)
    positions = [(b, n - 1) for b, n in enumerate(lens)]
    exact = loop_attention(q, k, v, tables, seq_lens, 0.25, positions)
    k16, v16, q16 = k.bfloat16(), v.bfloat16(), q.bfloat16()
    baseline = (decode_attention(q16, k16, v16, tables, seq_lens, 0.25, backend="torch").float() - exact).abs().max()
    err = (decode_attention(q16, k16, v16, tables, seq_lens, 0.25, backend=backend).float() - exact).abs().max()
    assert err <= 2 * baseline + 1e-3


def test_decode_attention_errors():
    g = torch.Generator().manual_seed(0)
    k, v, tables, lens = paged_case([3, 5], 4, 2, 8, g)
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="query heads"):
        decode_attention(torch.randn(2, 3, 8), k, v, tables, lens, 1.0)
    with pytest.raises(ValueError, match=r"block_tables must be \(2, max_blocks\) and seq_lens \(2,\)"):
        decode_attention(q, k, v, tables[:1], lens, 1.0)
    with pytest.raises(ValueError, match="q is torch.float32, the cache torch.bfloat16"):
        decode_attention(q, k.bfloat16(), v.bfloat16(), tables, lens, 1.0)
    with pytest.raises(ValueError, match=r"seq_lens must be in \[1, 12\]"):
        decode_attention(q, k, v, tables, torch.tensor([3, 13]), 1.0)
    with pytest.raises(ValueError, match=r"seq_lens must be in"):
        decode_attention(q, k, v, tables, torch.tensor([0, 5]), 1.0)
    with pytest.raises(ValueError, match="block ids must be in"):
        decode_attention(q, k, v, tables + 100, lens, 1.0)
    with pytest.raises(ValueError, match="int32 or int64"):
        decode_attention(q, k, v, tables.float(), lens, 1.0)
    with pytest.raises(ValueError, match="cos and sin must both be"):
        decode_attention(q, k, v, tables, lens, 1.0, torch.randn(2, 8), None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,block_size", [([1, 300, 4097], 16), ([33, 64], 64)])
def test_decode_attention_on_gpu(dtype, lens, block_size):
    g = torch.Generator().manual_seed(len(lens))
    k, v, tables, seq_lens = paged_case(lens, block_size, 2, 128, g)
    q = torch.randn(len(lens), 12, 128, generator=g)
    cos, sin = torch.randn(len(lens), 128, generator=g), torch.randn(len(lens), 128, generator=g)
    positions = [(b, n - 1) for b, n in enumerate(lens)]
    exact = loop_attention(rotate(q, cos, sin), k, v, tables, seq_lens, 128**-0.5, positions)
    cuda = [t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in (q, k, v, tables, seq_lens, cos, sin)]
    qc, kc, vc, tc, lc, cc, sc = cuda
    baseline = (decode_attention(qc, kc, vc, tc, lc, 128**-0.5, cc, sc, backend="torch").float().cpu() - exact).abs().max()
    got = decode_attention(qc, kc, vc, tc, lc, 128**-0.5, cc, sc, backend="triton").float().cpu()
    assert torch.isfinite(got).all()
    assert (got - exact).abs().max() <= 2 * baseline + (1e-5 if dtype == torch.float32 else 1e-3)
