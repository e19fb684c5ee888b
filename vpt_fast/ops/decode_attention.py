"""decode_attention: one new query per sequence against a paged KV cache.

The cache is vLLM's paged layout, [num_blocks, block_size, kv_heads, head_dim]; sequence
b's keys are at positions 0 .. seq_lens[b] - 1, position i in block block_tables[b, i //
block_size] at offset i % block_size. Lengths and block tables live on the device, so a
decode step has the same shapes and launches at every step and can be captured in a CUDA
graph. Backends: "cuda" is flash-attn's `flash_attn_with_kvcache` where installed (its
paged cache needs a block size that is a multiple of 256), "triton" the Triton kernel
(preferred on CUDA otherwise), "torch" SDPA over the gathered blocks with a length mask:
the definition and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import choose, triton_or_torch
from .mrope import apply_rotary


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """(num_blocks, block_size, kv_heads, D) cache, (B, M) tables -> (B, M * block_size, kv_heads, D)."""
    B, M = block_tables.shape
    return cache[block_tables.long()].reshape(B, M * cache.shape[1], *cache.shape[2:])


def decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale: float, cos=None, sin=None) -> torch.Tensor:
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
    if heads != kv_heads:
        K = K.repeat_interleave(heads // kv_heads, dim=1)
        V = V.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q[:, :, None, :], K, V, attn_mask=live[:, None, None, :], scale=scale)
    return out[:, :, 0]


def _flash_available(block_size: int) -> bool | str:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    if block_size % 256:
        return f"flash-attn's paged cache needs a block size that is a multiple of 256, this one is {block_size}"
    return True


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
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if rows and not capturing:
        capacity = block_tables.shape[1] * k_cache.shape[1]
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < 1 or hi > capacity:
            raise ValueError(f"{op}: seq_lens must be in [1, {capacity}] (the block tables' reach), got [{lo}, {hi}]")
        if block_tables.numel() and (int(block_tables.min()) < 0 or int(block_tables.max()) >= k_cache.shape[0]):
            raise ValueError(f"{op}: block ids must be in [0, {k_cache.shape[0]})")


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, cos=None, sin=None, *,
                     backend: str | None = None, check: bool = True) -> torch.Tensor:
    """Attention of each sequence's new query over its first seq_lens[b] cached keys, read
    through its block table; with cos/sin (B, head_dim) the query's RoPE is applied first
    (fused in the Triton kernel).

    check=False skips validation (the engine's decode step, whose shapes are fixed by construction).
    """
    if check:
        check_paged("decode_attention", q, k_cache, v_cache, block_tables, seq_lens, q.shape[0])
        if (cos is None) != (sin is None) or (cos is not None and cos.shape != (q.shape[0], q.shape[-1])):
            raise ValueError(f"decode_attention: cos and sin must both be ({q.shape[0]}, {q.shape[-1]}) or both None")
    on_cuda = q.device.type == "cuda"
    options = {"cuda": _flash_available(k_cache.shape[1]) if on_cuda else "flash-attn needs CUDA tensors",
               **triton_or_torch(q.device.type, "decode_attention")}
    name = choose("decode_attention", backend, options)
    if name == "cuda":
        from flash_attn import flash_attn_with_kvcache

        if cos is not None:
            q = apply_rotary(q, cos[:, None, :], sin[:, None, :])
        out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seq_lens.to(torch.int32),
                                      block_table=block_tables.to(torch.int32), softmax_scale=scale, causal=True)
        return out[:, 0]
    if name == "triton":
        from ..kernels.decode_attention import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, cos, sin)
    return decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, cos, sin)
