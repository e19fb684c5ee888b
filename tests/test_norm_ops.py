"""add_rms_norm, rms_norm and silu_mul, every backend against transformers' own Qwen2-VL modules
(RMSNorm and the SiLU gate) and the torch definitions, in float32 and bfloat16; opcheck."""

from __future__ import annotations

import pytest
import torch
from op_cases import runnable, spy_backends, use_backend
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRMSNorm

from vpt_fast.ops import add_rms_norm, silu_mul
from vpt_fast.ops.norm import IMPLEMENTATIONS, add_rms_norm_torch, silu_mul_torch

BACKENDS = ["torch", "triton"]


def implementation(op: str, backend: str, device_type: str = "cpu"):
    runnable(op, backend, device_type)
    return IMPLEMENTATIONS[op][backend]


def close(got, want, dtype) -> bool:
    """float32: within 1e-5; bf16: within 4 units in the last place (Triton's interpreter
    truncates at each of the rounding points where torch rounds to nearest)."""
    err = (got.float() - want.float()).abs()
    bound = 1e-5 if dtype == torch.float32 else 4 * 2**-7 * want.float().abs() + 1e-3
    return bool((err <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_definitions_are_transformers_arithmetic(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = 96
    norm = Qwen2VLRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    norm = norm.to(dtype)
    x, res = torch.randn(5, hidden, generator=g).to(dtype), torch.randn(5, hidden, generator=g).to(dtype)
    total, normed = add_rms_norm_torch(x, res, norm.weight, 1e-6)
    assert torch.equal(total, x + res)
    assert torch.equal(normed, norm(x + res))
    gate, up = torch.randn(4, 200, generator=g).to(dtype), torch.randn(4, 200, generator=g).to(dtype)
    assert torch.equal(silu_mul_torch(gate, up), torch.nn.SiLU()(gate) * up)


def _hf_norm(weight: torch.Tensor) -> Qwen2VLRMSNorm:
    norm = Qwen2VLRMSNorm(weight.shape[0], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(weight.float())
    return norm.to(weight.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(3, 96), (1, 1536), (7, 100)])
def test_backends_match_transformers_modules(backend, dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    res = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    norm = _hf_norm(w)
    with torch.no_grad():
        got_sum, got = implementation("add_rms_norm", backend)(x, res, w, 1e-6)
        assert close(got_sum, x + res, dtype) and close(got, norm(x + res), dtype)
        assert close(implementation("rms_norm", backend)(x, w, 1e-6), norm(x), dtype)
        gate = torch.randn(rows, 2 * hidden + 3, generator=g).to(dtype)
        up = torch.randn(rows, 2 * hidden + 3, generator=g).to(dtype)
        assert close(implementation("silu_mul", backend)(gate, up), torch.nn.SiLU()(gate) * up, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_public_functions_run_the_chosen_backend(monkeypatch, backend):
    spies = []
    for op in ("add_rms_norm", "rms_norm", "silu_mul"):
        use_backend(monkeypatch, op, backend)
        spies.append(spy_backends(monkeypatch, IMPLEMENTATIONS[op], op))
    x, w = torch.randn(2, 16), torch.randn(16)
    norm = _hf_norm(w)
    with torch.no_grad():
        total, normed = add_rms_norm(x, None, w, 1e-6)
        assert total is x and close(normed, norm(x), torch.float32)
        total, normed = add_rms_norm(x, x, w, 1e-6)
        assert close(normed, norm(x + x), torch.float32)
        assert close(silu_mul(x, x), torch.nn.SiLU()(x) * x, torch.float32)
    ran = [call for spy in spies for call in spy]
    assert ran and all(name == backend for _, name in ran), ran
    assert {op for op, _ in ran} >= {"add_rms_norm", "silu_mul"}, ran


def test_opcheck():
    x, res, w = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    torch.library.opcheck(torch.ops.vpt_fast.add_rms_norm.default, (x, res, w, 1e-6))
    torch.library.opcheck(torch.ops.vpt_fast.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.vpt_fast.silu_mul.default, (x, res))


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        add_rms_norm(x, None, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm(x, torch.randn(2, 8).half(), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="gate and up must match"):
        silu_mul(x, torch.randn(2, 9))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1536, generator=g).to("cuda", dtype)
    res = torch.randn(32, 1536, generator=g).to("cuda", dtype)
    w = (1 + 0.1 * torch.randn(1536, generator=g)).to("cuda", dtype)
    want_sum, want = add_rms_norm_torch(x, res, w, 1e-6)
    got_sum, got = implementation("add_rms_norm", "triton", "cuda")(x, res, w, 1e-6)
    assert torch.equal(got_sum, want_sum) and close(got, want, dtype)
    gate, up = torch.randn(32, 8960, generator=g).to("cuda", dtype), torch.randn(32, 8960, generator=g).to("cuda", dtype)
    assert close(implementation("silu_mul", "triton", "cuda")(gate, up), silu_mul_torch(gate, up), dtype)
    torch.library.opcheck(torch.ops.vpt_fast.add_rms_norm.default, (x, res, w, 1e-6))
