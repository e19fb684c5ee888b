"""Triton kernel of kv_splice: write new keys/values into a KV cache at flat slots.

One program per token: it reads the token's slot (-1: nothing to do) and copies its
kv_heads x head_dim key and value into row `slot` of the flattened caches
(blocks * block_size, kv_heads, head_dim). With cos/sin the key is rotated on the way
(rotate-half RoPE, in float32, then cast to the cache dtype once).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..ops._registry import launcher


@triton.jit
def _kv_splice_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, cos_ptr, sin_ptr,
    k_stride_t, k_stride_h, k_stride_d, v_stride_t, v_stride_h, v_stride_d,
    cos_stride_t, cos_stride_d, sin_stride_t, sin_stride_d,
    HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ROTATE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HEADS) & (d < DIM)
        dst = slot * (HEADS * DIM) + h * DIM + d

        k_row = k_ptr + token * k_stride_t + h * k_stride_h
        k = tl.load(k_row + d * k_stride_d, mask=mask, other=0.0)
        if ROTATE:
            half: tl.constexpr = DIM // 2
            # rotate_half(k)[d] = -k[d + D/2] for d < D/2, k[d - D/2] after
            partner = tl.where(d < half, d + half, d - half)
            k_partner = tl.load(k_row + partner * k_stride_d, mask=mask, other=0.0).to(tl.float32)
            k_partner = tl.where(d < half, -k_partner, k_partner)
            cos = tl.load(cos_ptr + token * cos_stride_t + d * cos_stride_d, mask=d < DIM, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + token * sin_stride_t + d * sin_stride_d, mask=d < DIM, other=0.0).to(tl.float32)
            k = k.to(tl.float32) * cos + k_partner * sin
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)

        v = tl.load(v_ptr + token * v_stride_t + h * v_stride_h + d * v_stride_d, mask=mask, other=0.0)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def kv_splice_triton(k_new, v_new, k_cache, v_cache, slot_mapping, cos=None, sin=None) -> None:
    """In place, arguments as `kv_splice_torch`, already checked (contiguous caches, one device)."""
    tokens = slot_mapping.numel()
    if tokens == 0:
        return
    heads, dim = k_cache.shape[-2:]
    rotate = cos is not None
    if not rotate:  # never read: any pointer of the right kind will do
        cos = sin = k_new
    launch = launcher(_kv_splice_kernel)
    # a fused multiply-add rounds once where torch's k * cos + rotate_half(k) * sin rounds three
    # times: eager launches keep the products apart so the keys match the torch definition bit
    # for bit (a launch traced by torch.compile takes no such option and may fuse them)
    options = {"enable_fp_fusion": False} if launch is _kv_splice_kernel else {}
    launch[(tokens,)](
        k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin,
        *k_new.stride(), *v_new.stride(),
        cos.stride(0), cos.stride(-1), sin.stride(0), sin.stride(-1),
        HEADS=heads, DIM=dim, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
        ROTATE=rotate, **options,
    )
