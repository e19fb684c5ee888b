"""decode_attention: one new query per sequence against the engine's slot cache.

Lengths live on the device, so a decode step has the same shapes and launches at
every step and can be captured in a CUDA graph. Backends: "cuda" is flash-attn's
`flash_attn_with_kvcache` where installed, "triton" the Triton kernel (preferred on
CUDA otherwise), "torch" SDPA over the whole slot with a length mask: the definition
and the CPU path.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ._dispatch import choose, triton_or_torch
from .mrope import apply_rotary


def decode_attention_reference(q, k_cache, v_cache, slots, seq_lens, scale: float, cos=None, sin=None) -> torch.Tensor:
    """q (B, heads, D); caches (slots, max_len, kv_heads, D); slots, seq_lens (B,) -> (B, heads, D).

    With cos/sin (B, D), the query is rotated first (rotate-half RoPE, as transformers does)."""
    if cos is not None:
        q = apply_rotary(q, cos[:, None, :], sin[:, None, :])
    B, heads, D = q.shape
    kv_heads, max_len = k_cache.shape[2], k_cache.shape[1]
    live = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]  # (B, max_len)
    # entries past a length are stale (rolled back, never written): zero them, as a masked NaN still poisons
    K = torch.where(live[:, :, None, None], k_cache[slots], 0).transpose(1, 2)
    V = torch.where(live[:, :, None, None], v_cache[slots], 0).transpose(1, 2)
    if heads != kv_heads:
        K = K.repeat_interleave(heads // kv_heads, dim=1)
        V = V.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q[:, :, None, :], K, V, attn_mask=live[:, None, None, :], scale=scale)
    return out[:, :, 0]


def _flash_available() -> bool | str:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    return True


def _check(q, k_cache, v_cache, slots, seq_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: q must be (B, heads, D) and caches (slots, max_len, kv_heads, D), got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"decode_attention: head_dim {q.shape[-1]} vs {k_cache.shape[-1]}, or {q.shape[1]} query heads "
                         f"not a multiple of {k_cache.shape[2]} kv heads")
    if slots.shape != (q.shape[0],) or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"decode_attention: slots and seq_lens must be ({q.shape[0]},), got {tuple(slots.shape)}, {tuple(seq_lens.shape)}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"decode_attention: q is {q.dtype}, the cache {k_cache.dtype}")


def decode_attention(q, k_cache, v_cache, slots, seq_lens, scale: float, cos=None, sin=None, *,
                     backend: str | None = None, check: bool = True) -> torch.Tensor:
    """Attention of each sequence's new query over its first seq_lens[b] cached keys; with
    cos/sin (B, head_dim) the query's RoPE is applied first (fused in the Triton kernel).

    check=False skips validation (the engine's decode step, whose shapes are fixed by construction).
    """
    if check:
        _check(q, k_cache, v_cache, slots, seq_lens)
        if (cos is None) != (sin is None) or (cos is not None and cos.shape != (q.shape[0], q.shape[-1])):
            raise ValueError(f"decode_attention: cos and sin must both be ({q.shape[0]}, {q.shape[-1]}) or both None")
    on_cuda = q.device.type == "cuda"
    options = {"cuda": _flash_available() if on_cuda else "flash-attn needs CUDA tensors",
               **triton_or_torch(q.device.type, "decode_attention")}
    name = choose("decode_attention", backend, options)
    if name == "cuda":
        from flash_attn import flash_attn_with_kvcache

        if cos is not None:
            q = apply_rotary(q, cos[:, None, :], sin[:, None, :])
        out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=seq_lens.to(torch.int32),
                                      cache_batch_idx=slots.to(torch.int32), softmax_scale=scale, causal=True)
        return out[:, 0]
    if name == "triton":
        from ..kernels.decode_attention import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, slots, seq_lens, scale, cos, sin)
    return decode_attention_reference(q, k_cache, v_cache, slots, seq_lens, scale, cos, sin)
