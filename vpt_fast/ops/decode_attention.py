"""decode_attention: one new query per sequence against a paged KV cache.

The cache is vLLM's paged layout, [num_blocks, block_size, kv_heads, head_dim]; sequence
b's keys are at positions 0 .. seq_lens[b] - 1, position i in block block_tables[b, i //
block_size] at offset i % block_size. Lengths and block tables live on the device, so a
decode step has the same shapes and launches at every step and can be captured in a CUDA
graph. The op is `torch.ops.vpt_fast.decode_attention`. Backends: torch (`decode_attention_torch`,
SDPA over the gathered blocks with a length mask: the definition), triton (the kernel in
`vpt_fast.kernels.decode_attention`, the query's RoPE fused) and flash_attn
(`flash_attn_with_kvcache`, where installed, asked for by name only: its paged cache needs
a block size that is a multiple of 256).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _registry
from .mrope import apply_rotary

OP = "decode_attention"


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """(num_blocks, block_size, kv_heads, D) cache, (B, M) tables -> (B, M * block_size, kv_heads, D)."""
    B, M = block_tables.shape
    return cache[block_tables.long()].reshape(B, M * cache.shape[1], *cache.shape[2:])


def decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale: float, cos=None, sin=None) -> torch.Tensor:
    """q (B, heads, D); caches (num_blocks, block_size, kv_heads, D); block_tables (B, M); seq_lens (B,)
    -> (B, heads, D). With cos/sin (B, D), the query is rotated first (rotate-half RoPE, as
    transformers does)."""
    if cos is not None:
        q = apply_rotary(q, cos[:, None, :], sin[:, None, :])
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    K, V = gather_blocks(k_cache, block_tables), gather_blocks(v_cache, block_tables)
    live = torch.arange(K.shape[1], device=q.device)[None, :] < seq_lens[:, None]  # (B, M * block_size)
    # entries past a length are stale (rolled back, another request's, never written): zero them,
    # as a masked NaN still poisons the softmax
    K = torch.where(live[:, :, None, None], K, 0).transpose(1, 2)
    V = torch.where(live[:, :, None, None], V, 0).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None, :], K, V, attn_mask=live[:, None, None, :], scale=scale,
                                         enable_gqa=heads != kv_heads)  # kv head j serves query heads j*g .. j*g+g-1
    return out[:, :, 0]


def decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale: float, cos=None, sin=None) -> torch.Tensor:
    from ..kernels.decode_attention import decode_attention_triton as launch

    return launch(q, k_cache, v_cache, block_tables, seq_lens, scale, cos, sin)


def decode_attention_flash_attn(q, k_cache, v_cache, block_tables, seq_lens, scale: float, cos=None, sin=None) -> torch.Tensor:
    from flash_attn import flash_attn_with_kvcache

    if k_cache.shape[1] % 256:
        raise ValueError(f"decode_attention: flash-attn's paged cache needs a block size that is a multiple of 256, "
                         f"this one is {k_cache.shape[1]}")
    if cos is not None:
        q = apply_rotary(q, cos[:, None, :], sin[:, None, :])
    out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seq_lens.to(torch.int32),
                                  block_table=block_tables.to(torch.int32), softmax_scale=scale, causal=True)
    return out[:, 0]


IMPLEMENTATIONS = {"torch": decode_attention_torch, "triton": decode_attention_triton,
                   "flash_attn": decode_attention_flash_attn}
_registry.register(OP, {"triton": _registry.triton_status("decode_attention"), "flash_attn": _registry.flash_attn_status})


@_registry.define(OP, fake=lambda q, *args: torch.empty_like(q))
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, cos: Optional[torch.Tensor],
                         sin: Optional[torch.Tensor]) -> torch.Tensor:
    return IMPLEMENTATIONS[_registry.backend(OP, q.device.type)](q, k_cache, v_cache, block_tables, seq_lens, scale, cos, sin)


def check_paged(op: str, q, k_cache, v_cache, block_tables, seq_lens, rows: int) -> None:
    """Shapes, dtypes and devices shared by the paged attention ops; rows = number of sequences."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: q must be (tokens, heads, D) and caches (num_blocks, block_size, kv_heads, D), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{op}: head_dim {q.shape[-1]} vs {k_cache.shape[-1]}, or {q.shape[1]} query heads "
                         f"not a multiple of {k_cache.shape[2]} kv heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != rows or seq_lens.shape != (rows,):
        raise ValueError(f"{op}: block_tables must be ({rows}, max_blocks) and seq_lens ({rows},), got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    if block_tables.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: block_tables and seq_lens must be int32 or int64, got {block_tables.dtype}, {seq_lens.dtype}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: q is {q.dtype}, the cache {k_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{op}: caches must be contiguous")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if rows and not _registry.tracing(q):
        capacity = block_tables.shape[1] * k_cache.shape[1]
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 1 or hi > capacity:
            raise ValueError(f"{op}: seq_lens must be in [1, {capacity}] (the block tables' reach), got [{lo}, {hi}]")
        if block_tables.numel() and (int(block_tables.min()) < 0 or int(block_tables.max()) >= k_cache.shape[0]):
            raise ValueError(f"{op}: block ids must be in [0, {k_cache.shape[0]})")


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, cos=None, sin=None, *,
                     check: bool = True) -> torch.Tensor:
    """Attention of each sequence's new query over its first seq_lens[b] cached keys, read
    through its block table; with cos/sin (B, head_dim) the query's RoPE is applied first.

    check=False skips validation (the engine's decode step, whose shapes are right by construction).
    """
    if check:
        check_paged("decode_attention", q, k_cache, v_cache, block_tables, seq_lens, q.shape[0])
        if (cos is None) != (sin is None) or (cos is not None and cos.shape != (q.shape[0], q.shape[-1])):
            raise ValueError(f"decode_attention: cos and sin must both be ({q.shape[0]}, {q.shape[-1]}) or both None")
    return torch.ops.vpt_fast.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, cos, sin)
