"""kv_splice: write a ragged batch of new keys/values into a KV cache at given slots.

Slot semantics follow vLLM's `reshape_and_cache_flash`: a cache is [num_blocks, block_size,
kv_heads, head_dim] (the engine's paged layout), an int64 flat slot is block * block_size +
offset, -1 skips a token, and the number of slots says how many tokens are written (k_new /
v_new may hold more rows, padding for graph capture). With cos/sin given (per token,
(tokens, head_dim), the M-RoPE-composed tables that transformers' Qwen2-VL rotary embedding
returns), the keys are rotated on the way in. Rollback is bookkeeping of lengths, no copy.

The op is `torch.ops.vpt_fast.kv_splice` (mutating k_cache and v_cache). Backends: torch
(`kv_splice_torch`, the definition), triton (`vpt_fast.kernels.kv_splice`) and ext (the
extension's C++/CUDA kernels). The Triton and extension kernels rotate in float32 whatever
the input dtypes; the definition rotates in the promoted dtype of k_new and cos, so they
agree bit for bit whenever either of those is float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _registry
from .mrope import apply_rotary

OP = "kv_splice"


def kv_splice_torch(k_new, v_new, k_cache, v_cache, slot_mapping, cos=None, sin=None) -> None:
    """The definition, in plain torch."""
    n = slot_mapping.numel()
    k, v = k_new[:n], v_new[:n]
    if cos is not None:
        k = apply_rotary(k, cos[:n, None, :], sin[:n, None, :])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, heads, dim)[slots] = v[keep].to(v_cache.dtype)


def kv_splice_triton(k_new, v_new, k_cache, v_cache, slot_mapping, cos=None, sin=None) -> None:
    from ..kernels.kv_splice import kv_splice_triton as launch

    launch(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin)


def kv_splice_ext(k_new, v_new, k_cache, v_cache, slot_mapping, cos=None, sin=None) -> None:
    torch.ops.vpt_fast_ext.kv_splice(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin)


IMPLEMENTATIONS = {"torch": kv_splice_torch, "triton": kv_splice_triton, "ext": kv_splice_ext}
_registry.register(OP, {"triton": _registry.triton_status("kv_splice"), "ext": _registry.extension_status("kv_splice")})


@_registry.define(OP, mutates_args=("k_cache", "v_cache"), fake=lambda *args: None)
def _kv_splice_op(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> None:
    IMPLEMENTATIONS[_registry.backend(OP, k_cache.device.type)](k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin)


def _check(k_new, v_new, k_cache, v_cache, slot_mapping, cos=None, sin=None) -> None:
    """Validate kv_splice's arguments; the slot range is checked only where it costs no device sync."""
    tensors = {"k_new": k_new, "v_new": v_new, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kv_splice: {name} must be a tensor, got {type(t).__name__}")
    if k_new.dim() != 3 or v_new.shape != k_new.shape:
        raise ValueError(f"kv_splice: k_new and v_new must both be (tokens, kv_heads, head_dim), got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"kv_splice: caches must both be (blocks, block_size, kv_heads, head_dim), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[-2:] != k_new.shape[-2:]:
        raise ValueError(f"kv_splice: cache heads/dim {tuple(k_cache.shape[-2:])} differ from the new tokens' {tuple(k_new.shape[-2:])}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kv_splice: caches must be contiguous")
    if slot_mapping.dim() != 1 or slot_mapping.dtype != torch.int64:
        raise ValueError(f"kv_splice: slot_mapping must be 1-D int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if slot_mapping.numel() > k_new.shape[0]:
        raise ValueError(f"kv_splice: {slot_mapping.numel()} slots for {k_new.shape[0]} new tokens")
    if k_new.dtype != v_new.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"kv_splice: dtypes differ: k_new {k_new.dtype}, v_new {v_new.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    devices = {t.device for t in tensors.values()}
    if cos is not None or sin is not None:
        if cos is None or sin is None:
            raise ValueError("kv_splice: give both cos and sin, or neither")
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] < slot_mapping.numel() or cos.shape[1] != k_new.shape[-1]:
            raise ValueError(f"kv_splice: cos/sin must be (tokens, {k_new.shape[-1]}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
        devices |= {cos.device, sin.device}
    if len(devices) != 1:
        raise ValueError(f"kv_splice: all tensors must be on one device, got {sorted(map(str, devices))}")
    if slot_mapping.numel() and not _registry.tracing(slot_mapping):
        capacity = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= capacity:
            raise ValueError(f"kv_splice: slots must be -1 (skip) or in [0, {capacity}), got values in [{lo}, {hi}]")


def kv_splice(k_new, v_new, k_cache, v_cache, slot_mapping, cos=None, sin=None, *, check: bool = True) -> None:
    """Write k_new/v_new (tokens, kv_heads, head_dim) into the caches at `slot_mapping`, in place.

    check=False skips validation: for callers whose shapes are right by construction (the
    engine's steps).
    """
    if check:
        _check(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin)
    torch.ops.vpt_fast.kv_splice(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin)
