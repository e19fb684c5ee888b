"""pytest-benchmark suites of the ops: one group per op, every backend that runs on the device
against the torch definition, on the CPU and (with a GPU) on CUDA.

    pytest benchmarks/ --benchmark-only                 # CPU (and CUDA when present)
    pytest benchmarks/ --benchmark-only -m gpu          # CUDA only
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import pinned  # noqa: E402

from vpt_fast import ops  # noqa: E402
from vpt_fast.ops import _registry  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                    reason="no CUDA device")])]


def run_on(benchmark, op: str, backend: str, device: str, fn) -> None:
    if backend not in _registry.ops()[op]:
        pytest.skip(f"{op} has no {backend} backend")
    status = _registry._OPS[op][backend](device)
    if backend == "triton" and device == "cpu":
        status = "Triton runs on the CPU only in its interpreter"
    if status is not True:
        pytest.skip(str(status))
    benchmark.group = f"{op} on {device}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        fn()
        sync()

    with pinned(op, backend, torch.device(device)):
        call()  # the first call chooses, builds, compiles
        benchmark(call)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
def test_kv_splice(benchmark, device, backend):
    tokens, heads, dim = 4096, 2, 128
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k = torch.randn(tokens, heads, dim, device=device, dtype=dtype)
    kc = torch.zeros(tokens // 8, 16, heads, dim, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * 16, device=device)[:tokens]
    run_on(benchmark, "kv_splice", backend, device, lambda: ops.kv_splice(k, k, kc, vc, slots, check=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_attention(benchmark, device, backend):
    B, length, heads, kv_heads, dim = (8 if device == "cuda" else 1), 1024, 12, 2, 128
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    per_seq = length // 16
    q = torch.randn(B, heads, dim, device=device, dtype=dtype)
    kc = torch.randn(B * per_seq + 1, 16, kv_heads, dim, device=device, dtype=dtype)
    tables = (torch.randperm(B * per_seq, device=device) + 1).view(B, per_seq)
    lens = torch.full((B,), length, device=device)
    run_on(benchmark, "decode_attention", backend, device,
           lambda: ops.decode_attention(q, kc, kc, tables, lens, dim**-0.5, check=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_attention(benchmark, device, backend):
    length, new, heads, kv_heads, dim = 1024, 350, 12, 2, 128
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    per_seq = length // 16
    q = torch.randn(new, heads, dim, device=device, dtype=dtype)
    kc = torch.randn(per_seq + 1, 16, kv_heads, dim, device=device, dtype=dtype)
    tables = (torch.randperm(per_seq, device=device) + 1)[None]
    lens, cu = torch.tensor([length], device=device), torch.tensor([0, new], device=device)
    run_on(benchmark, "prefill_attention", backend, device,
           lambda: ops.prefill_attention(q, kc, kc, tables, lens, cu, dim**-0.5, max_new=new, check=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
def test_crop_patch_embed(benchmark, device, backend):
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1080, 1920, 3), dtype=torch.uint8, generator=gen).to(device)
    weight = torch.randn(1280, 3, 2, 14, 14, generator=gen).to(device)
    run_on(benchmark, "crop_patch_rows", backend, device,
           lambda: ops.crop_patch_embed(image, (480, 270, 1200, 675), (280, 504), weight=weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_rms_norm(benchmark, device, backend):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(32, 1536, device=device, dtype=dtype)
    w = torch.randn(1536, device=device, dtype=dtype)
    run_on(benchmark, "add_rms_norm", backend, device, lambda: ops.add_rms_norm(x, x, w, 1e-6, check=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_silu_mul(benchmark, device, backend):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(32, 8960, device=device, dtype=dtype)
    run_on(benchmark, "silu_mul", backend, device, lambda: ops.silu_mul(x, x, check=False))
