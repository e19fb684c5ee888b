"""prefill_attention: causal attention of a ragged batch of new tokens over a paged cache, every
backend against a per-query loop; error paths."""

import pytest
import torch
from attention_cases import loop_attention, paged_case
from op_cases import runnable, spy_backends, use_backend

from vpt_fast.ops.prefill_attention import IMPLEMENTATIONS, prefill_attention

BACKENDS = ["torch", "triton"]


def implementation(backend: str, device_type: str = "cpu"):
    runnable("prefill_attention", backend, device_type)
    return IMPLEMENTATIONS[backend]


def queries(lens, new, heads, dim, gen):
    q = torch.randn(sum(new), heads, dim, generator=gen)
    cu = torch.tensor([0] + new).cumsum(0)
    positions = [(b, n - m + j) for b, (n, m) in enumerate(zip(lens, new)) for j in range(m)]
    return q, cu, positions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads,dim,block_size,lens,new", [
    (4, 2, 16, 4, [10, 3, 70], [10, 1, 23]),  # a whole prompt, one token, a segment after a cached prefix
    (2, 2, 8, 16, [17, 40], [0, 40]),  # a sequence with nothing new
    (6, 1, 32, 5, [90], [81]),  # more new tokens than one query block
    (4, 4, 12, 3, [7, 11], [2, 5]),  # a head size that is not a power of two
])
def test_prefill_attention_matches_a_loop(backend, heads, kv_heads, dim, block_size, lens, new):
    g = torch.Generator().manual_seed(heads * dim + block_size)
    k, v, tables, seq_lens = paged_case(lens, block_size, kv_heads, dim, g)
    q, cu, positions = queries(lens, new, heads, dim, g)
    want = loop_attention(q, k, v, tables, seq_lens, dim**-0.5, positions)
    got = implementation(backend)(q, k, v, tables, seq_lens, cu, dim**-0.5, max(new))
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().amax(dim=(1, 2)).nonzero()[:8].flatten().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_attention_bf16_error_within_torch_bf16_error(backend):
    g = torch.Generator().manual_seed(3)
    lens, new = [20, 37], [20, 9]
    k, v, tables, seq_lens = paged_case(lens, 8, 2, 16, g)
    q, cu, positions = queries(lens, new, 4, 16, g)
    exact = loop_attention(q, k, v, tables, seq_lens, 0.25, positions)
    k16, v16, q16 = k.bfloat16(), v.bfloat16(), q.bfloat16()
    baseline = (IMPLEMENTATIONS["torch"](q16, k16, v16, tables, seq_lens, cu, 0.25).float() - exact).abs().max()
    err = (implementation(backend)(q16, k16, v16, tables, seq_lens, cu, 0.25, max(new)).float() - exact).abs().max()
    assert err <= 2 * baseline + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_runs_the_chosen_backend(monkeypatch, backend):
    use_backend(monkeypatch, "prefill_attention", backend)
    ran = spy_backends(monkeypatch, IMPLEMENTATIONS)
    g = torch.Generator().manual_seed(2)
    lens, new = [5, 12], [5, 4]
    k, v, tables, seq_lens = paged_case(lens, 4, 2, 16, g)
    q, cu, positions = queries(lens, new, 4, 16, g)
    want = loop_attention(q, k, v, tables, seq_lens, 0.25, positions)
    assert (prefill_attention(q, k, v, tables, seq_lens, cu, 0.25) - want).abs().max() <= 1e-5
    assert ran == [("", backend)], ran


def test_opcheck():
    """Schema, fake tensors and AOT dispatch of the torch backend (Triton's interpreter cannot run on
    fake tensors: the Triton backend is checked on the GPU)."""
    g = torch.Generator().manual_seed(3)
    lens, new = [5, 12], [5, 4]
    k, v, tables, seq_lens = paged_case(lens, 4, 2, 16, g)
    q, cu, _ = queries(lens, new, 4, 16, g)
    torch.library.opcheck(torch.ops.vpt_fast.prefill_attention.default,
                          (q, k.nan_to_num(0.0), v.nan_to_num(0.0), tables, seq_lens, cu, 0.25, 5))


def test_prefill_attention_errors():
    g = torch.Generator().manual_seed(0)
    k, v, tables, lens = paged_case([3, 5], 4, 2, 8, g)
    q = torch.randn(4, 4, 8)
    with pytest.raises(ValueError, match=r"cu_seqlens must be int \(3,\)"):
        prefill_attention(q, k, v, tables, lens, torch.tensor([0, 4]), 1.0)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to 4"):
        prefill_attention(q, k, v, tables, lens, torch.tensor([0, 1, 3]), 1.0)
    with pytest.raises(ValueError, match="at most its seq_len"):
        prefill_attention(q, k, v, tables, lens, torch.tensor([0, 4, 4]), 1.0)
    with pytest.raises(ValueError, match="head_dim 6 vs 8"):
        prefill_attention(torch.randn(4, 4, 6), k, v, tables, lens, torch.tensor([0, 2, 4]), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,new,block_size", [([700, 20, 1300], [350, 20, 1], 16), ([130], [130], 64)])
def test_prefill_attention_on_gpu(dtype, lens, new, block_size):
    g = torch.Generator().manual_seed(len(lens))
    k, v, tables, seq_lens = paged_case(lens, block_size, 2, 128, g)
    q, cu, positions = queries(lens, new, 12, 128, g)
    exact = loop_attention(q, k, v, tables, seq_lens, 128**-0.5, positions)
    qc, kc, vc = (t.to("cuda", dtype) for t in (q, k, v))
    tc, lc, cuc = tables.cuda(), seq_lens.cuda(), cu.cuda()
    baseline = (IMPLEMENTATIONS["torch"](qc, kc, vc, tc, lc, cuc, 128**-0.5).float().cpu() - exact).abs().max()
    got = implementation("triton", "cuda")(qc, kc, vc, tc, lc, cuc, 128**-0.5, max(new)).float().cpu()
    assert torch.isfinite(got).all()
    assert (got - exact).abs().max() <= 2 * baseline + (1e-5 if dtype == torch.float32 else 1e-3)
    torch.library.opcheck(torch.ops.vpt_fast.prefill_attention.default,
                          (qc, kc.nan_to_num(0.0), vc.nan_to_num(0.0), tc, lc, cuc, 128**-0.5, max(new)))
