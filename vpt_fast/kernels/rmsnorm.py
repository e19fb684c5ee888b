"""Triton fused residual-add + RMSNorm, and SiLU-gate multiply, for decode steps.

Each replaces a chain of small elementwise kernels (cast, square, mean, rsqrt, two
multiplies, the residual add) with one launch per row; the arithmetic and its
rounding points follow transformers' Qwen2RMSNorm (float32 inside, cast back to the
input dtype before the weight) and its MLP (SiLU rounded to the input dtype before
the multiply).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import launcher


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps, HAS_RES: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    dtype = x.dtype
    # every operation in float32, rounded back to the input dtype where torch rounds it
    xf = x.to(tl.float32)
    if HAS_RES:
        xf = (xf + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        tl.store(sum_ptr + row * n_cols + cols, xf.to(dtype), mask=mask)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + residual, rmsnorm(x + residual) * weight) over the last dim; x and residual contiguous."""
    n = x.shape[-1]
    out, total = torch.empty_like(x), torch.empty_like(x)
    launcher(_add_rmsnorm_kernel)[(x.numel() // n,)](x, residual, weight, out, total, n, eps, HAS_RES=True,
                                                     BLOCK=triton.next_power_of_2(n))
    return total, out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight over the last dim; x contiguous."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    launcher(_add_rmsnorm_kernel)[(x.numel() // n,)](x, x, weight, out, x, n, eps, HAS_RES=False,
                                                     BLOCK=triton.next_power_of_2(n))
    return out


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + offs, (act * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    launcher(_silu_mul_kernel)[(triton.cdiv(n, 1024),)](gate, up, out, n, BLOCK=1024)
    return out
