"""Triton decode attention over a paged KV cache, lengths and block tables read on the device.

One program per (sequence, query head): it walks the sequence's keys in chunks up to its
length (a device value, so the launch is the same for every step and can be captured in a
CUDA graph), finds each key's block through the block table, and keeps an online softmax
in float32. Grouped-query attention maps query head h to key/value head h // groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import launcher


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, cos_ptr, sin_ptr, scale,
                             stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_ob, stride_oh, stride_tb, stride_tn,
                             GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROTATE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUPS
    length = tl.load(lens_ptr + b)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0)
    if ROTATE:  # rotate-half RoPE of the query, rounded to its dtype as the unfused path does
        half = HEAD_DIM // 2
        partner = tl.where(d < half, d + half, d - half)
        other = tl.load(q_ptr + b * stride_qb + h * stride_qh + partner, mask=dmask, other=0.0).to(tl.float32)
        other = tl.where(d < half, -other, other)
        c = tl.load(cos_ptr + b * HEAD_DIM + d, mask=dmask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + b * HEAD_DIM + d, mask=dmask, other=0.0).to(tl.float32)
        q = (q.to(tl.float32) * c + other * sn).to(q.dtype)
    q = q.to(tl.float32) * scale
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    start = 0
    while start < length:  # a while loop: the bound is a device value, the same launch at every step
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < length
        block = tl.load(table + (n // BLOCK_SIZE) * stride_tn, mask=nmask, other=0).to(tl.int64)
        rows = block * stride_kb + (n % BLOCK_SIZE).to(tl.int64) * stride_kn + kvh * stride_kh
        offs = rows[:, None] + d[None, :]
        mask2 = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(nmask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
        start += BLOCK_N
    out = acc / l_i
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, cos: torch.Tensor | None = None,
                            sin: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, heads, D), rotated first by cos/sin (B, D) when given; caches (num_blocks, block_size,
    kv_heads, D), contiguous in their last dimension; block_tables (B, M); -> (B, heads, D) in q's dtype."""
    q = q.contiguous()
    B, heads, D = q.shape
    groups = heads // k_cache.shape[2]
    out = torch.empty_like(q)
    launcher(_decode_attention_kernel)[(B, heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, cos if cos is not None else q, sin if sin is not None else q,
        scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        out.stride(1), block_tables.stride(0), block_tables.stride(1),
        GROUPS=groups, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_N=64, BLOCK_SIZE=k_cache.shape[1],
        ROTATE=cos is not None,
    )
    return out
