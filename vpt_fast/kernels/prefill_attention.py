"""Triton causal prefill attention over a paged KV cache (flash-attention style).

One program per (block of BLOCK_M new tokens of one sequence, query head). It walks the
sequence's keys in chunks of BLOCK_N, read in place through the block table, up to the
last key its rows may see, with an online softmax in float32 and the causal mask
(new token j of a sequence with ctx cached tokens before it sees keys 0 .. ctx + j).
Grouped-query heads read their key/value head directly: no repeated copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import interpreting_triton, launcher



@triton.jit
def _prefill_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, cu_ptr, scale,
                              stride_qt, stride_qh, stride_kb, stride_kn, stride_kh, stride_ot, stride_oh, stride_tb, stride_tn,
                              GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUPS
    first = tl.load(cu_ptr + b)
    count = tl.load(cu_ptr + b + 1) - first
    m0 = pid_m * BLOCK_M
    if m0 < count:
        total = tl.load(lens_ptr + b)
        ctx = total - count
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < count
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        tokens = (first + rows).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        table = tables_ptr + b.to(tl.int64) * stride_tb
        end = ctx + tl.minimum(m0 + BLOCK_M, count)  # one past the last key any row of this block sees
        limit = ctx + rows  # the last key each row sees
        start = 0
        while start < end:
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < end
            block = tl.load(table + (n // BLOCK_SIZE) * stride_tn, mask=nmask, other=0).to(tl.int64)
            offs = (block * stride_kb + (n % BLOCK_SIZE).to(tl.int64) * stride_kn + kvh * stride_kh)[:, None] + d[None, :]
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee" if DOT_F32 else "tf32") * scale
            s = tl.where((n[None, :] <= limit[:, None]) & nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee" if DOT_F32 else "tf32")
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            start += BLOCK_N
        out = acc / l_i[:, None]
        tl.store(out_ptr + tokens[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                             seq_lens: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, max_new: int) -> torch.Tensor:
    """Arguments as `prefill_attention_reference` (already checked), plus the largest number of
    new tokens of one sequence (the grid's first dimension); -> (N, heads, D) in q's dtype."""
    q = q.contiguous()
    N, heads, D = q.shape
    out = torch.empty_like(q)
    B = block_tables.shape[0]
    if N == 0 or B == 0:
        return out
    block_m = 16 if max_new <= 16 else 64
    grid = (triton.cdiv(max_new, block_m), B, heads)
    launcher(_prefill_attention_kernel)[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0), block_tables.stride(1),
        GROUPS=heads // k_cache.shape[2], HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_m,
        BLOCK_N=32, BLOCK_SIZE=k_cache.shape[1],
        # float32 stays float32 (no TF32 rounding of the products); 16-bit inputs use the tensor cores as
        # usual, except in Triton's interpreter, whose dot multiplies 16-bit floats as integers
        DOT_F32=q.dtype == torch.float32 or interpreting_triton(),
    )
    return out
