"""decode_attention over a paged cache: every backend against a per-query loop, on scattered
blocks whose stale entries are NaN; error paths."""

import pytest
import torch
from attention_cases import loop_attention, paged_case, rotate
from op_cases import can_run, runnable, spy_backends, use_backend

from vpt_fast.ops.decode_attention import IMPLEMENTATIONS, decode_attention

BACKENDS = ["torch", "triton"]


def implementation(backend: str, device_type: str = "cpu"):
    runnable("decode_attention", backend, device_type)
    return IMPLEMENTATIONS[backend]


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
    got = implementation(backend)(q, k, v, tables, seq_lens, scale)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5
    cos, sin = torch.randn(len(lens), dim, generator=g), torch.randn(len(lens), dim, generator=g)
    want = loop_attention(rotate(q, cos, sin), k, v, tables, seq_lens, scale, [(b, n - 1) for b, n in enumerate(lens)])
    got = implementation(backend)(q, k, v, tables, seq_lens, scale, cos, sin)
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
    baseline = (IMPLEMENTATIONS["torch"](q16, k16, v16, tables, seq_lens, 0.25).float() - exact).abs().max()
    err = (implementation(backend)(q16, k16, v16, tables, seq_lens, 0.25).float() - exact).abs().max()
    assert err <= 2 * baseline + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_runs_the_chosen_backend(monkeypatch, backend):
    use_backend(monkeypatch, "decode_attention", backend)
    ran = spy_backends(monkeypatch, IMPLEMENTATIONS)
    g = torch.Generator().manual_seed(2)
    k, v, tables, seq_lens = paged_case([3, 9], 4, 2, 16, g)
    q = torch.randn(2, 4, 16, generator=g)
    want = loop_attention(q, k, v, tables, seq_lens, 0.25, [(0, 2), (1, 8)])
    assert (decode_attention(q, k, v, tables, seq_lens, 0.25) - want).abs().max() <= 1e-5
    assert ran == [("", backend)], ran


def test_opcheck():
    """Schema, fake tensors and AOT dispatch of the torch backend (Triton's interpreter cannot run on
    fake tensors: the Triton backend is checked on the GPU)."""
    g = torch.Generator().manual_seed(3)
    k, v, tables, seq_lens = paged_case([3, 9], 4, 2, 16, g)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    q, cos, sin = torch.randn(2, 4, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    torch.library.opcheck(torch.ops.vpt_fast.decode_attention.default, (q, k, v, tables, seq_lens, 0.25, cos, sin))


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
    baseline = (IMPLEMENTATIONS["torch"](qc, kc, vc, tc, lc, 128**-0.5, cc, sc).float().cpu() - exact).abs().max()
    got = implementation("triton", "cuda")(qc, kc, vc, tc, lc, 128**-0.5, cc, sc).float().cpu()
    assert torch.isfinite(got).all()
    assert (got - exact).abs().max() <= 2 * baseline + (1e-5 if dtype == torch.float32 else 1e-3)
    torch.library.opcheck(torch.ops.vpt_fast.decode_attention.default, (qc, kc.nan_to_num(0.0), vc.nan_to_num(0.0), tc, lc,
                                                                       128**-0.5, cc, sc))


@pytest.mark.gpu
def test_gpu_flash_attn_when_installed():
    """flash-attn's paged decode (blocks of 256) against the loop; skipped, with the reason, where the
    package is not installed."""
    status = can_run("decode_attention", "flash_attn", "cuda")
    if status is not True:
        pytest.skip(str(status))
    g = torch.Generator().manual_seed(5)
    lens = [1, 300, 700]
    k, v, tables, seq_lens = paged_case(lens, 256, 2, 128, g)
    q = torch.randn(len(lens), 12, 128, generator=g)
    exact = loop_attention(q, k, v, tables, seq_lens, 128**-0.5, [(b, n - 1) for b, n in enumerate(lens)])
    qc, kc, vc = (t.to("cuda", torch.bfloat16) for t in (q, k.nan_to_num(0.0), v.nan_to_num(0.0)))
    baseline = (IMPLEMENTATIONS["torch"](qc, kc, vc, tables.cuda(), seq_lens.cuda(), 128**-0.5).float().cpu() - exact).abs().max()
    got = IMPLEMENTATIONS["flash_attn"](qc, kc, vc, tables.cuda(), seq_lens.cuda(), 128**-0.5).float().cpu()
    assert (got - exact).abs().max() <= 2 * baseline + 1e-3
