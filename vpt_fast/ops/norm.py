"""Fused elementwise ops of the decoder layer: residual add + RMSNorm, RMSNorm, and the SwiGLU gate.

The torch versions are the definitions (transformers' Qwen2-VL arithmetic, with its rounding
points); the Triton kernels (`vpt_fast.kernels.rmsnorm`) replace a chain of small launches
with one. The ops are `torch.ops.vpt_fast.add_rms_norm`, `rms_norm` and `silu_mul`; backends
torch and triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry


def add_rms_norm_torch(x, residual, weight, eps: float):
    """(x + residual, RMSNorm(x + residual) * weight), residual None meaning none: the definition."""
    total = x if residual is None else x + residual
    h = total.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return total, weight * h.to(total.dtype)


def rms_norm_torch(x, weight, eps: float):
    return add_rms_norm_torch(x, None, weight, eps)[1]


def silu_mul_torch(gate, up):
    return F.silu(gate) * up


def add_rms_norm_triton(x, residual, weight, eps: float):
    from ..kernels.rmsnorm import add_rms_norm_triton as launch

    return launch(x.contiguous(), residual.contiguous(), weight, eps)


def rms_norm_triton(x, weight, eps: float):
    from ..kernels.rmsnorm import rms_norm_triton as launch

    return launch(x.contiguous(), weight, eps)


def silu_mul_triton(gate, up):
    from ..kernels.rmsnorm import silu_mul_triton as launch

    return launch(gate.contiguous(), up.contiguous())


IMPLEMENTATIONS = {
    "add_rms_norm": {"torch": add_rms_norm_torch, "triton": add_rms_norm_triton},
    "rms_norm": {"torch": rms_norm_torch, "triton": rms_norm_triton},
    "silu_mul": {"torch": silu_mul_torch, "triton": silu_mul_triton},
}
for _op in IMPLEMENTATIONS:
    _registry.register(_op, {"triton": _registry.triton_status("rmsnorm")})


@_registry.define("add_rms_norm", fake=lambda x, *args: (torch.empty_like(x), torch.empty_like(x)))
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return IMPLEMENTATIONS["add_rms_norm"][_registry.backend("add_rms_norm", x.device.type)](x, residual, weight, eps)


@_registry.define("rms_norm", fake=lambda x, *args: torch.empty_like(x))
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return IMPLEMENTATIONS["rms_norm"][_registry.backend("rms_norm", x.device.type)](x, weight, eps)


@_registry.define("silu_mul", fake=lambda gate, up: torch.empty_like(gate))
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return IMPLEMENTATIONS["silu_mul"][_registry.backend("silu_mul", gate.device.type)](gate, up)


def _check_norm(x, residual, weight) -> None:
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"add_rms_norm: residual must match x {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")


def add_rms_norm(x, residual, weight, eps: float, *, check: bool = True):
    """(x + residual, RMSNorm(x + residual) * weight); with residual None, (x, RMSNorm(x) * weight)."""
    if check:
        _check_norm(x, residual, weight)
    if residual is None:
        return x, torch.ops.vpt_fast.rms_norm(x, weight, eps)
    return torch.ops.vpt_fast.add_rms_norm(x, residual, weight, eps)


def silu_mul(gate, up, *, check: bool = True):
    """SiLU(gate) * up, as transformers' Qwen2-VL MLP computes it."""
    if check and (gate.shape != up.shape or gate.dtype != up.dtype):
        raise ValueError(f"silu_mul: gate and up must match, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    return torch.ops.vpt_fast.silu_mul(gate, up)
