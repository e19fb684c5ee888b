"""The C++ CPU kernels of the extension (csrc/vpt_ops.cpp), built on first use by vpt_fast._ext,
against the plain torch definitions: kv_splice bit for bit in float32, crop_patch_rows within
1e-5 of a gather + einsum reference and of transformers' own Qwen2-VL image processor.

The first run builds the extension (about a minute) into the cache folder's ext/ (or
$VPT_FAST_BUILD_DIR); later runs reuse it.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from ext_cases import (  # noqa: I001
    assert_rows_close,
    splice_with_reference,
    CLIP_MEAN,
    CLIP_STD,
    assert_bits_equal,
    crop_inputs,
    crop_patch_rows_torch,
    reference_caches,
    splice_inputs,
)

from vpt_fast import _ext


def _toolchain_missing() -> str | None:
    from torch.utils.cpp_extension import verify_ninja_availability

    try:
        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler})"
    return None


@pytest.fixture(scope="module")
def ext():
    missing = _toolchain_missing()
    if missing:
        pytest.skip(f"cannot build the extension: {missing}")
    if _ext.disabled():
        pytest.skip("the extension is disabled by VPT_FAST_NO_EXT")
    ops = _ext.load()
    assert ops is not None, _ext.available("cpu")
    assert _ext.available("cpu") is True
    return ops


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- loader


def test_loader_caches_and_reports(ext):
    assert _ext.load() is ext
    assert _ext.source_dir() is not None
    cuda = _ext.available("cuda")
    assert cuda is True or (isinstance(cuda, str) and cuda.startswith("built without CUDA"))
    if torch.version.cuda is None:
        assert cuda == "built without CUDA (torch has no CUDA)"
    assert isinstance(_ext.available("mps"), str)


def test_loader_disabled_by_env(ext, monkeypatch):
    monkeypatch.setenv("VPT_FAST_NO_EXT", "1")
    assert _ext.load() is None
    assert _ext.available("cpu") == "disabled by VPT_FAST_NO_EXT"
    monkeypatch.setenv("VPT_FAST_NO_EXT", "0")
    assert _ext.available("cpu") is True


# ----------------------------------------------------------------------------- kv_splice




@pytest.mark.parametrize("layout", ["engine", "paged"])
@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("tokens", [1, 7, 37])
def test_kv_splice_fp32_bit_exact(ext, gen, layout, rotate, tokens):
    args = splice_inputs(layout, tokens, 4, 64, gen, rotate=rotate)
    k_exp, v_exp = splice_with_reference(ext, *args)
    assert_bits_equal(args[2], k_exp, "k_cache")
    assert_bits_equal(args[3], v_exp, "v_cache")
    assert args[2].isnan().any()  # untouched slots keep their poison


@pytest.mark.parametrize("in_dtype,cache_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float16, torch.float32),
    (torch.float64, torch.float32),
])
def test_kv_splice_casts_bit_exact(ext, gen, in_dtype, cache_dtype):
    """Copies and casts match bit for bit; so do rotations where the reference rotates in the
    kernel's own precision (float32 or wider inputs: not float16, which it rotates in float16)."""
    for rotate in (False, True) if in_dtype != torch.float16 else (False,):
        args = splice_inputs("paged", 29, 2, 32, gen, in_dtype=in_dtype, cache_dtype=cache_dtype, rotate=rotate)
        k_exp, v_exp = splice_with_reference(ext, *args)
        assert_bits_equal(args[2], k_exp, f"k_cache rotate={rotate}")
        assert_bits_equal(args[3], v_exp, f"v_cache rotate={rotate}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kv_splice_half_precision(ext, gen, dtype):
    """Half-precision keys are rotated in float32 and rounded once: exactly the reference run on
    the same values in float32 and then cast, and no further from the exact rotation than the
    reference run in `dtype` (which rounds each product and the sum)."""
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 45, 4, 64, gen, in_dtype=dtype,
                                                                    cache_dtype=dtype, rotate=True)
    k_low, v_low = reference_caches(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    wide = (k_new.float(), v_new.float(), k_cache.float(), v_cache.float(), slots, cos.float(), sin.float())
    k_exact, _ = reference_caches(*wide)
    ext.kv_splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exact.to(dtype), "k_cache vs float32 rotation")
    assert_bits_equal(v_cache, v_low, "v_cache")
    written = ~k_exact.isnan()
    err_kernel = (k_cache.float() - k_exact)[written].abs().max()
    err_reference = (k_low.float() - k_exact)[written].abs().max()
    assert err_kernel <= err_reference, (err_kernel, err_reference)


def test_kv_splice_promotes_cos_dtype(ext, gen):
    """bfloat16 keys with float32 tables: the reference promotes to float32, and so does the op."""
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("engine", 13, 2, 16, gen, in_dtype=torch.bfloat16,
                                                                    cache_dtype=torch.bfloat16, rotate=True)
    cos, sin = cos.float(), sin.float()
    k_exp, v_exp = splice_with_reference(ext, k_new, v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exp, "k_cache")
    assert_bits_equal(v_cache, v_exp, "v_cache")


def test_kv_splice_strided_inputs(ext, gen):
    """Keys/values sliced from a fused projection, heads-major values, tables cut from wider rows
    and a non-unit innermost stride all read the same values."""
    tokens, heads, dim = 21, 3, 32
    _, _, k_cache, v_cache, slots, _, _ = splice_inputs("paged", tokens, heads, dim, gen, pad=0)
    qkv = torch.randn(tokens + 2, 3, heads, dim, generator=gen)
    k_new = qkv[:, 1]
    v_new = torch.randn(heads, tokens + 2, dim, generator=gen).transpose(0, 1)
    tables = torch.randn(tokens + 2, 2 * dim, generator=gen)
    cos, sin = tables[:, :dim], tables[:, dim:]
    k_exp, v_exp = splice_with_reference(ext, k_new, v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exp, "k_cache")
    assert_bits_equal(v_cache, v_exp, "v_cache")

    every_other = torch.randn(tokens, heads, 2 * dim, generator=gen)[..., ::2]
    k_exp, v_exp = splice_with_reference(ext, every_other, every_other, k_cache, v_cache, slots)
    assert_bits_equal(k_cache, k_exp, "k_cache, strided head_dim")


def test_kv_splice_no_slots_and_all_skipped(ext, gen):
    k_new, v_new, k_cache, v_cache, slots, _, _ = splice_inputs("paged", 9, 2, 8, gen)
    ext.kv_splice(k_new, v_new, k_cache, v_cache, slots[:0], None, None)
    ext.kv_splice(k_new, v_new, k_cache, v_cache, torch.full_like(slots, -1), None, None)
    assert k_cache.isnan().all() and v_cache.isnan().all()


def test_kv_splice_meta(ext):
    k = torch.empty(5, 2, 8, device="meta")
    cache = torch.empty(4, 16, 2, 8, device="meta")
    ext.kv_splice(k, k, cache, cache.clone(), torch.empty(5, dtype=torch.int64, device="meta"), None, None)
    with pytest.raises(RuntimeError, match="slot_mapping must be int64"):
        ext.kv_splice(k, k, cache, cache.clone(), torch.empty(5, dtype=torch.int32, device="meta"), None, None)


def _splice_args(gen, **changes):
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 7, 2, 8, gen, rotate=True)
    args = dict(k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots, cos=cos, sin=sin)
    args.update(changes)
    return args


@pytest.mark.parametrize("change,message", [
    (lambda a: {"slot_mapping": a["slot_mapping"].int()}, "slot_mapping must be int64, got Int"),
    (lambda a: {"slot_mapping": a["slot_mapping"][None]}, "slot_mapping must be 1-D"),
    (lambda a: {"slot_mapping": torch.zeros(11, dtype=torch.int64)}, "11 slots for 10 new tokens"),
    (lambda a: {"slot_mapping": torch.tensor([0, 1, 40000])}, r"slot_mapping\[2\] = 40000 is neither -1"),
    (lambda a: {"slot_mapping": torch.tensor([0, -2])}, r"slot_mapping\[1\] = -2 is neither -1"),
    (lambda a: {"k_cache": a["k_cache"][0], "v_cache": a["v_cache"][0]},
     r"k_cache must be \(blocks, block_size, kv_heads, head_dim\)"),
    (lambda a: {"k_cache": a["k_cache"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
                "v_cache": a["v_cache"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)},
     "k_cache and v_cache must be contiguous"),
    (lambda a: {"k_cache": a["k_cache"].double(), "v_cache": a["v_cache"].double()},
     "k_cache must be float32, float16 or bfloat16, got Double"),
    (lambda a: {"v_cache": a["v_cache"].half()}, "v_cache must have k_cache's dtype Float"),
    (lambda a: {"k_new": a["k_new"][..., :4], "v_new": a["v_new"][..., :4]}, "must match k_new's"),
    (lambda a: {"v_new": a["v_new"][:5]}, "v_new must have k_new's shape"),
    (lambda a: {"k_new": a["k_new"].int(), "v_new": a["v_new"].int()}, "k_new must be a floating point tensor"),
    (lambda a: {"sin": None}, "give both cos and sin, or neither"),
    (lambda a: {"cos": a["cos"][:, :4], "sin": a["sin"][:, :4]}, r"cos must be \(tokens >= 7, 8\)"),
    (lambda a: {"cos": a["cos"][:3], "sin": a["sin"][:3]}, r"cos must be \(tokens >= 7, 8\)"),
    (lambda a: {"sin": a["sin"].double()}, "sin must have cos's dtype Float"),
], ids=["slots-int32", "slots-2d", "too-many-slots", "slot-past-end", "slot-below-minus-one", "cache-3d",
        "cache-noncontiguous", "cache-double", "cache-dtypes-differ", "head-dim-mismatch", "v-shape",
        "k-int", "cos-without-sin", "cos-width", "cos-rows", "sin-dtype"])
def test_kv_splice_errors(ext, gen, change, message):
    args = _splice_args(gen)
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        ext.kv_splice(**args)


# ----------------------------------------------------------------------------- crop_patch_rows


@pytest.mark.parametrize("img_hw", [(37, 53), (100, 71)])
@pytest.mark.parametrize("out_hw", [(28, 56), (56, 84)])
@pytest.mark.parametrize("taps", [(1, 1), (2, 2), (4, 3)])
def test_crop_patch_rows_matches_reference(ext, gen, img_hw, out_hw, taps):
    args = crop_inputs(img_hw, out_hw, taps, gen)
    rows = ext.crop_patch_rows(*args, 14, 2)
    expected = crop_patch_rows_torch(*args, 14, 2)
    assert rows.shape == (out_hw[0] * out_hw[1] // 196, 588) and rows.dtype == torch.float32
    assert_rows_close(rows, expected)


@pytest.mark.parametrize("patch_size,merge_size,out_hw", [(14, 1, (42, 14)), (3, 2, (12, 18)), (2, 3, (6, 12))])
def test_crop_patch_rows_other_geometry(ext, gen, patch_size, merge_size, out_hw):
    args = crop_inputs((19, 23), out_hw, (3, 4), gen, normalized=False)
    rows = ext.crop_patch_rows(*args, patch_size, merge_size)
    assert_rows_close(rows, crop_patch_rows_torch(*args, patch_size, merge_size))


def test_crop_patch_rows_strided_tables(ext, gen):
    image, iy, wy, ix, wx, mean, std = crop_inputs((30, 40), (28, 28), (2, 3), gen)
    ix_t, wx_t = ix.t().contiguous().t(), wx.t().contiguous().t()
    rows = ext.crop_patch_rows(image, iy, wy, ix_t, wx_t, mean, std, 14, 2)
    assert_rows_close(rows, crop_patch_rows_torch(image, iy, wy, ix, wx, mean, std, 14, 2))


def test_crop_patch_rows_identity_matches_qwen_processor(ext, gen):
    """Identity tables (no resize): the rows of transformers' Qwen2-VL image processor, whose
    pixel rows hold each value twice (temporal patch 2)."""
    from transformers import Qwen2VLImageProcessor

    image = torch.randint(0, 256, (56, 84, 3), generator=gen, dtype=torch.uint8)
    iy = torch.arange(56, dtype=torch.int32)[:, None]
    ix = torch.arange(84, dtype=torch.int32)[:, None]
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    rows = ext.crop_patch_rows(image, iy, torch.ones(56, 1), ix, torch.ones(84, 1), mean, std, 14, 2)
    processor = Qwen2VLImageProcessor(do_resize=False, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    out = processor(images=[np.asarray(image)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    expected = out["pixel_values"].reshape(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588)
    assert_rows_close(rows, expected.float())


def test_crop_patch_rows_meta(ext):
    image = torch.empty(50, 60, 3, dtype=torch.uint8, device="meta")
    iy, ix = (torch.empty(n, 2, dtype=torch.int32, device="meta") for n in (28, 84))
    wy, wx = (torch.empty(n, 2, device="meta") for n in (28, 84))
    mean = torch.empty(3, device="meta")
    rows = ext.crop_patch_rows(image, iy, wy, ix, wx, mean, mean, 14, 2)
    assert rows.shape == (12, 588) and rows.device.type == "meta" and rows.dtype == torch.float32


@pytest.mark.parametrize("change,message", [
    (lambda a: {"image": a["image"].float()}, "image must be uint8, got Float"),
    (lambda a: {"image": a["image"][..., :2]}, r"image must be \(height, width, 3\)"),
    (lambda a: {"image": a["image"].permute(2, 0, 1).contiguous().permute(1, 2, 0)}, "image must be contiguous"),
    (lambda a: {"image": a["image"][:, ::2]}, "image must be contiguous"),
    (lambda a: {"iy": a["iy"].long()}, "iy must be int32, got Long"),
    (lambda a: {"wx": a["wx"].double()}, "wx must be float32, got Double"),
    (lambda a: {"wy": a["wy"][:, :1]}, r"wy must have iy's shape \[28, 2\], got \[28, 1\]"),
    (lambda a: {"ix": a["ix"][:, :0], "wx": a["wx"][:, :0]}, r"ix must be \(output columns, taps >= 1\)"),
    (lambda a: {"iy": a["iy"][:14], "wy": a["wy"][:14]}, "must be a multiple of patch_size \\* merge_size = 28"),
    (lambda a: {"mean": a["mean"][:2]}, r"mean must be float32 of shape \(3,\)"),
    (lambda a: {"std": a["std"].double()}, r"std must be float32 of shape \(3,\), got Double"),
    (lambda a: {"patch_size": 0}, "patch_size and merge_size must be positive"),
    (lambda a: {"iy": torch.where(a["iy"] == a["iy"].max(), 99, a["iy"])},
     r"iy holds source row indices in \[\d+, 99\], outside the image's \[0, 40\)"),
    (lambda a: {"ix": torch.cat([torch.full_like(a["ix"][:1], -1), a["ix"][1:]])},
     r"ix holds source column indices in \[-1, \d+\], outside the image's \[0, 50\)"),
], ids=["image-float", "image-channels", "image-chw", "image-strided", "iy-int64", "wx-double", "wy-shape",
        "no-taps", "size-not-multiple", "mean-shape", "std-dtype", "patch-zero", "iy-range", "ix-range"])
def test_crop_patch_rows_errors(ext, gen, change, message):
    image, iy, wy, ix, wx, mean, std = crop_inputs((40, 50), (28, 56), (2, 2), gen)
    args = dict(image=image, iy=iy, wy=wy, ix=ix, wx=wx, mean=mean, std=std, patch_size=14, merge_size=2)
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        ext.crop_patch_rows(**args)
