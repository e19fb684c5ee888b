"""Fused decode-step elementwise ops: residual add + RMSNorm, and the SwiGLU gate.

The torch versions are the definitions (transformers' Qwen2-VL arithmetic); on CUDA
the Triton kernels replace a chain of small launches with one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import choose, triton_or_torch


def add_rms_norm_reference(x, residual, weight, eps: float):
    total = x if residual is None else x + residual
    h = total.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return total, weight * h.to(total.dtype)


def silu_mul_reference(gate, up):
    return F.silu(gate) * up


def _backend(op: str, t: torch.Tensor, backend: str | None) -> str:
    return choose(op, backend, triton_or_torch(t.device.type, "rmsnorm"))


def add_rms_norm(x, residual, weight, eps: float, *, backend: str | None = None):
    """(x + residual, RMSNorm(x + residual) * weight); residual may be None. x contiguous."""
    if _backend("add_rms_norm", x, backend) == "triton":
        from ..kernels.rmsnorm import add_rmsnorm_triton

        return add_rmsnorm_triton(x.contiguous(), None if residual is None else residual.contiguous(), weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def silu_mul(gate, up, *, backend: str | None = None):
    """SiLU(gate) * up, as transformers' Qwen2-VL MLP computes it."""
    if _backend("silu_mul", gate, backend) == "triton":
        from ..kernels.rmsnorm import silu_mul_triton

        return silu_mul_triton(gate.contiguous(), up.contiguous())
    return silu_mul_reference(gate, up)
