"""The CUDA kernels of the extension (csrc/vpt_ops_cuda.cu) against the plain torch definitions:
kv_splice bit for bit in float32 (vectorized and scalar paths, strided and misaligned inputs,
a 4M-element splice, half-precision caches, CUDA-graph replay), crop_patch_rows within 1e-5.
Run with `pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch
from ext_cases import assert_rows_close, splice_with_reference, assert_bits_equal, crop_inputs, crop_patch_rows_torch, reference_caches, splice_inputs

from vpt_fast import _ext

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ops = _ext.load()
    status = _ext.available("cuda")
    assert status is True, f"the extension has no CUDA kernels: {status}"
    return ops


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)




# ----------------------------------------------------------------------------- kv_splice


@pytest.mark.parametrize("layout", ["engine", "paged"])
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("tokens", [1, 7, 37])
@pytest.mark.parametrize("dim", [64, 72, 10], ids=["dim64", "dim72", "dim10-scalar"])
def test_kv_splice_fp32_bit_exact(ext, gen, layout, rotate, tokens, dim):
    args = splice_inputs(layout, tokens, 4, dim, gen, rotate=rotate, device="cuda")
    k_exp, v_exp = splice_with_reference(ext, *args)
    assert_bits_equal(args[2], k_exp, "k_cache")
    assert_bits_equal(args[3], v_exp, "v_cache")


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_splice_large(ext, gen, cache_dtype):
    """4096 tokens x 8 heads x 128 (4.2M elements per cache) into a paged cache, keys rotated."""
    args = splice_inputs("paged", 4096, 8, 128, gen, cache_dtype=cache_dtype, rotate=True, skip=0.05, device="cuda")
    assert args[0][: args[4].numel()].numel() >= 1 << 22
    k_exp, v_exp = splice_with_reference(ext, *args)
    assert_bits_equal(args[2], k_exp, "k_cache")
    assert_bits_equal(args[3], v_exp, "v_cache")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [128, 72], ids=["vectorized", "scalar"])
def test_kv_splice_half_precision(ext, gen, dtype, dim):
    """Half-precision keys rotated in float32 and rounded once: the float32 reference, cast."""
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 301, 8, dim, gen, in_dtype=dtype,
                                                                    cache_dtype=dtype, rotate=True, device="cuda")
    _, v_exp = reference_caches(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    wide = (k_new.float(), v_new.float(), k_cache.float(), v_cache.float(), slots, cos.float(), sin.float())
    k_exact, _ = reference_caches(*wide)
    ext.kv_splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exact.to(dtype), "k_cache vs float32 rotation")
    assert_bits_equal(v_cache, v_exp, "v_cache")


def test_kv_splice_strided_and_misaligned(ext, gen):
    tokens, heads, dim = 53, 4, 64
    _, _, k_cache, v_cache, slots, _, _ = splice_inputs("paged", tokens, heads, dim, gen, pad=0, device="cuda")
    qkv = torch.randn(tokens + 2, 3, heads, dim, device="cuda")
    k_new = qkv[:, 1]
    v_new = torch.randn(heads, tokens + 2, dim, device="cuda").transpose(0, 1)
    tables = torch.randn(tokens + 2, 2 * dim, device="cuda")
    cos, sin = tables[:, :dim], tables[:, dim:]
    k_exp, v_exp = splice_with_reference(ext, k_new, v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exp, "k_cache, strided")
    assert_bits_equal(v_cache, v_exp, "v_cache, strided")
    # one float past a 16-byte boundary: the scalar path
    shifted = torch.randn(tokens * heads * dim + 1, device="cuda")[1:].view(tokens, heads, dim)
    k_exp, v_exp = splice_with_reference(ext, shifted, shifted, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exp, "k_cache, misaligned")
    assert_bits_equal(v_cache, v_exp, "v_cache, misaligned")


def test_kv_splice_matches_cpu_kernel(ext, gen):
    args = splice_inputs("paged", 77, 2, 64, gen, rotate=True)
    cuda_args = [t.cuda() for t in args]
    ext.kv_splice(*args)
    ext.kv_splice(*cuda_args)
    assert_bits_equal(cuda_args[2].cpu(), args[2], "k_cache")
    assert_bits_equal(cuda_args[3].cpu(), args[3], "v_cache")


def test_kv_splice_cuda_graph_replay(ext, gen):
    """Captured once, replayed with new tokens and slots written into the captured inputs."""
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 16, 2, 64, gen, rotate=True, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        ext.kv_splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ext.kv_splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    fresh = splice_inputs("paged", 16, 2, 64, torch.Generator().manual_seed(1), rotate=True, device="cuda")
    for static, new in zip((k_new, v_new, k_cache, v_cache, slots, cos, sin), fresh):
        static.copy_(new)
    k_exp, v_exp = reference_caches(*fresh)
    graph.replay()
    assert_bits_equal(k_cache, k_exp, "k_cache after replay")
    assert_bits_equal(v_cache, v_exp, "v_cache after replay")


def test_kv_splice_device_mismatch(ext, gen):
    k_new, v_new, k_cache, v_cache, slots, _, _ = splice_inputs("paged", 5, 2, 8, gen, device="cuda")
    with pytest.raises(RuntimeError, match="slot_mapping is on cpu but k_cache is on cuda"):
        ext.kv_splice(k_new, v_new, k_cache, v_cache, slots.cpu(), None, None)


# ----------------------------------------------------------------------------- crop_patch_rows


@pytest.mark.parametrize("img_hw", [(37, 53), (100, 71)])
@pytest.mark.parametrize("out_hw", [(28, 56), (56, 84), (448, 644)])
@pytest.mark.parametrize("taps", [(1, 1), (2, 2), (4, 3)])
def test_crop_patch_rows_matches_reference(ext, gen, img_hw, out_hw, taps):
    args = crop_inputs(img_hw, out_hw, taps, gen)
    expected = crop_patch_rows_torch(*args, 14, 2)
    rows = ext.crop_patch_rows(*[t.cuda() for t in args], 14, 2)
    assert rows.is_cuda and rows.shape == expected.shape
    assert_rows_close(rows.cpu(), expected)
    assert_rows_close(rows.cpu(), ext.crop_patch_rows(*args, 14, 2))


@pytest.mark.parametrize("patch_size,merge_size,out_hw", [(14, 1, (42, 14)), (3, 2, (12, 18)), (40, 1, (80, 40))])
def test_crop_patch_rows_other_geometry(ext, gen, patch_size, merge_size, out_hw):
    """Signed weights; patches of 9, 196 and 1600 pixels (more than one block's threads)."""
    args = crop_inputs((19, 23), out_hw, (3, 4), gen, normalized=False)
    rows = ext.crop_patch_rows(*[t.cuda() for t in args], patch_size, merge_size)
    assert_rows_close(rows.cpu(), crop_patch_rows_torch(*args, patch_size, merge_size))


def test_crop_patch_rows_device_mismatch(ext, gen):
    image, iy, wy, ix, wx, mean, std = crop_inputs((30, 40), (28, 28), (2, 2), gen)
    with pytest.raises(RuntimeError, match="iy is on cpu but image is on cuda"):
        ext.crop_patch_rows(image.cuda(), iy, wy.cuda(), ix.cuda(), wx.cuda(), mean.cuda(), std.cuda(), 14, 2)
