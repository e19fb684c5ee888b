"""crop_patch_rows, the kernel contract of crop_patch_embed, every backend (torch definition,
Triton, the extension's C++/CUDA kernels) against a gather + einsum reference written apart
from the op, a pixel-by-pixel loop, and transformers' own Qwen2-VL processor where nothing is
resized; argument errors, opcheck and torch.compile. The Triton kernels run in Triton's
interpreter on the CPU; `-m gpu` adds the CUDA cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from op_cases import CLIP_MEAN, CLIP_STD, assert_rows_close, crop_inputs, gather_einsum_rows, runnable, use_backend

from vpt_fast.ops import crop_patch_embed, crop_patch_rows_torch, resample_tables
from vpt_fast.ops.crop_patch_embed import IMPLEMENTATIONS, pil_vertical_first

BACKENDS = ["torch", "triton", "ext"]


def implementation(backend: str, device_type: str = "cpu"):
    runnable("crop_patch_rows", backend, device_type)
    return IMPLEMENTATIONS[backend]


def _table_args(height, width, box, out_hw, device="cpu", seed=0, max_side=512):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=gen).to(device)
    tables = resample_tables(height, width, box, out_hw, max_side, device=device)
    return [image, *tables, torch.tensor(CLIP_MEAN, device=device), torch.tensor(CLIP_STD, device=device)]


ROWS_CASES = {
    # name: (image height, width, box, out_hw)
    "crop to 28x56": (50, 70, (3, 4, 66, 47), (28, 56)),
    "crop to 56x28": (50, 70, (3, 4, 66, 47), (56, 28)),
    "whole image, no resize": (28, 56, (0, 0, 56, 28), (28, 56)),
    "downscale": (60, 150, (0, 0, 150, 60), (28, 56)),
    "tiny crop upscaled": (30, 40, (20, 3, 25, 9), (56, 56)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ROWS_CASES))
def test_resampling_tables_cases(backend, case):
    rows = implementation(backend)
    args = _table_args(*ROWS_CASES[case], seed=len(case))
    height, width, box, out_hw = ROWS_CASES[case]
    capped = box[3] - box[1], box[2] - box[0]
    for vertical_first in {False, pil_vertical_first(capped, out_hw)}:
        assert_rows_close(rows(*args, 14, 2, vertical_first), gather_einsum_rows(*args, 14, 2, vertical_first),
                          f"{case}, vertical_first={vertical_first}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("img_hw", [(37, 53), (100, 71)])
@pytest.mark.parametrize("out_hw", [(28, 56), (56, 84)])
@pytest.mark.parametrize("taps", [(1, 1), (2, 2), (4, 3)])
def test_random_tables_match_a_gather_einsum(backend, img_hw, out_hw, taps):
    rows = implementation(backend)
    args = crop_inputs(img_hw, out_hw, taps, torch.Generator().manual_seed(sum(img_hw) + sum(taps)))
    got = rows(*args, 14, 2)
    assert got.shape == (out_hw[0] * out_hw[1] // 196, 588) and got.dtype == torch.float32
    assert_rows_close(got, gather_einsum_rows(*args, 14, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("patch_size,merge_size,out_hw", [(14, 1, (42, 14)), (3, 2, (12, 18)), (2, 3, (6, 12))])
def test_other_patch_geometry_and_signed_weights(backend, patch_size, merge_size, out_hw):
    rows = implementation(backend)
    args = crop_inputs((19, 23), out_hw, (3, 4), torch.Generator().manual_seed(patch_size), normalized=False)
    assert_rows_close(rows(*args, patch_size, merge_size), gather_einsum_rows(*args, patch_size, merge_size))


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_strided_tables(backend):
    rows = implementation(backend)
    image, iy, wy, ix, wx, mean, std = crop_inputs((30, 40), (28, 28), (2, 3), torch.Generator().manual_seed(1))
    ix_t, wx_t = ix.t().contiguous().t(), wx.t().contiguous().t()
    assert_rows_close(rows(image, iy, wy, ix_t, wx_t, mean, std, 14, 2), gather_einsum_rows(image, iy, wy, ix, wx, mean, std, 14, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_tables_give_the_qwen_processor_rows(backend):
    """No resize: the rows of transformers' Qwen2-VL image processor, whose rows hold each value
    twice (temporal patch 2)."""
    from transformers import Qwen2VLImageProcessor

    rows = implementation(backend)
    image = torch.randint(0, 256, (56, 84, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    iy = torch.arange(56, dtype=torch.int32)[:, None]
    ix = torch.arange(84, dtype=torch.int32)[:, None]
    got = rows(image, iy, torch.ones(56, 1), ix, torch.ones(84, 1), torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD), 14, 2)
    processor = Qwen2VLImageProcessor(do_resize=False, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    out = processor(images=[np.asarray(image)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert_rows_close(got, out["pixel_values"].reshape(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588).float())


def test_definition_matches_a_pixel_by_pixel_loop():
    """crop_patch_rows_torch against the contract written out pixel by pixel (small case)."""
    image, iy, wy, ix, wx, mean, std = _table_args(40, 50, (3, 2, 47, 39), (28, 56))
    rows = crop_patch_rows_torch(image, iy, wy, ix, wx, mean, std, 14, 2)
    img = image.double()
    pil_round = lambda v: torch.floor(v + 0.5).clamp(0, 255)  # noqa: E731  PIL ends each 8-bit pass this way
    pixels = torch.zeros(28, 56, 3, dtype=torch.float64)
    for i in range(iy.shape[1]):
        row = torch.zeros(28, 56, 3, dtype=torch.float64)
        for j in range(ix.shape[1]):
            row += wx[None, :, j, None].double() * img[iy[:, i].long()][:, ix[:, j].long()]
        pixels += wy[:, i, None, None].double() * pil_round(row)
    pixels = pil_round(pixels).permute(2, 0, 1)
    pixels = (pixels / 255 - mean.double()[:, None, None]) / std.double()[:, None, None]
    # processor order: merge groups (h/2, w/2), inside each the 2x2 patches row by row
    expected = torch.stack([pixels[:, (gy * 2 + my) * 14:(gy * 2 + my + 1) * 14, (gx * 2 + mx) * 14:(gx * 2 + mx + 1) * 14].reshape(-1)
                            for gy in range(1) for gx in range(2) for my in range(2) for mx in range(2)])
    torch.testing.assert_close(rows.double(), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_patch_embed_runs_the_chosen_backend(monkeypatch, backend):
    use_backend(monkeypatch, "crop_patch_rows", backend)
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (45, 90, 3), dtype=torch.uint8, generator=gen)
    weight = torch.randn(16, 3, 2, 14, 14, generator=gen)
    calls = []
    real = IMPLEMENTATIONS[backend]
    monkeypatch.setitem(IMPLEMENTATIONS, backend, lambda *args: calls.append(backend) or real(*args))
    rows = crop_patch_embed(image, (5, 2, 88, 40), (28, 84))
    embeddings = crop_patch_embed(image, (5, 2, 88, 40), (28, 84), weight=weight)
    assert calls == [backend, backend]
    single = rows.view(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588)
    torch.testing.assert_close(embeddings, single @ weight.sum(2).reshape(16, -1).T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_opcheck(monkeypatch, backend):
    """Schemas, fake tensors and AOT dispatch of both ops (Triton's interpreter cannot run on fake
    tensors: that backend is checked on the GPU)."""
    use_backend(monkeypatch, "crop_patch_rows", backend)
    args = _table_args(30, 70, (2, 1, 69, 30), (28, 56))
    torch.library.opcheck(torch.ops.vpt_fast.crop_patch_rows.default, (*args, 14, 2, False))
    image = args[0]
    torch.library.opcheck(torch.ops.vpt_fast.crop_patch_embed.default,
                          (image, [2, 1, 69, 30], [28, 56], list(CLIP_MEAN), list(CLIP_STD), 512, 14, 2, 2, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_into_a_graph():
    args = _table_args(30, 70, (2, 1, 69, 30), (28, 56))

    def embed(image, weight):
        rows = torch.ops.vpt_fast.crop_patch_rows(image, *args[1:], 14, 2, False)
        return rows @ weight

    weight = torch.randn(588, 8)
    compiled = torch.compile(embed, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(args[0], weight), embed(args[0], weight))


# ----------------------------------------------------------------------------- the extension's own checks


@pytest.fixture
def ext():
    runnable("crop_patch_rows", "ext")
    return torch.ops.vpt_fast_ext


def test_ext_fake_kernel(ext):
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
def test_ext_checks_its_arguments(ext, change, message):
    image, iy, wy, ix, wx, mean, std = crop_inputs((40, 50), (28, 56), (2, 2), torch.Generator().manual_seed(0))
    args = dict(image=image, iy=iy, wy=wy, ix=ix, wx=wx, mean=mean, std=std, patch_size=14, merge_size=2)
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        ext.crop_patch_rows(**args)


# ----------------------------------------------------------------------------- GPU


GPU_BACKENDS = ["triton", "ext"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_resampling_tables(backend):
    rows = implementation(backend, "cuda")
    cases = {**ROWS_CASES,
             "big image, cap": (900, 1500, (0, 0, 1500, 900), (308, 504)),
             "big crop": (1080, 1920, (301, 97, 1777, 1040), (336, 504)),
             "aspect clamp": (28, 9000, (0, 0, 9000, 28), (28, 5040)),
             "odd": (333, 517, (7, 11, 290, 301), (280, 280))}
    for name, case in cases.items():
        args = _table_args(*case, "cuda", seed=len(name), max_side=20000 if name == "aspect clamp" else 512)
        for vertical_first in (False, True):
            assert_rows_close(rows(*args, 14, 2, vertical_first), crop_patch_rows_torch(*args, 14, 2, vertical_first),
                              f"{backend}: {name}, vertical_first={vertical_first}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("patch_size,merge_size,out_hw", [(14, 2, (448, 644)), (14, 1, (42, 14)), (40, 1, (80, 40))])
def test_gpu_random_tables(backend, patch_size, merge_size, out_hw):
    """Signed weights; patches of 196 and 1600 pixels (more than one block's threads)."""
    rows = implementation(backend, "cuda")
    args = crop_inputs((37, 53), out_hw, (3, 4), torch.Generator().manual_seed(patch_size), normalized=False)
    got = rows(*[t.cuda() for t in args], patch_size, merge_size)
    assert got.is_cuda
    assert_rows_close(got.cpu(), gather_einsum_rows(*args, patch_size, merge_size))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_crop_patch_embed(monkeypatch, backend):
    use_backend(monkeypatch, "crop_patch_rows", backend, "cuda")
    gen = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8, generator=gen).cuda()
    weight = torch.randn(1280, 3, 2, 14, 14, generator=gen).cuda()
    box, out_hw = (40, 30, 600, 420), (392, 560)
    frame = lambda rows: rows.view(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588)  # noqa: E731  both frames are equal
    single = frame(crop_patch_embed(image, box, out_hw))
    assert_rows_close(single, frame(crop_patch_embed(image.cpu(), box, out_hw)), f"{backend}: rows")
    for w, tol in ((weight, 1e-4), (weight.bfloat16(), 2e-2)):
        ours = crop_patch_embed(image, box, out_hw, weight=w)
        expected = single.to(w.dtype) @ w.sum(dim=2).reshape(w.shape[0], -1).T
        assert ours.dtype == w.dtype and ours.shape == expected.shape
        scale = float(expected.float().abs().max())
        assert float((ours.float() - expected.float()).abs().max()) <= tol * max(scale, 1.0), w.dtype
    torch.library.opcheck(torch.ops.vpt_fast.crop_patch_rows.default,
                          (*_table_args(30, 70, (2, 1, 69, 30), (28, 56), "cuda"), 14, 2, False))


@pytest.mark.gpu
def test_gpu_ext_device_mismatch():
    ext = implementation("ext", "cuda")
    image, iy, wy, ix, wx, mean, std = crop_inputs((30, 40), (28, 28), (2, 2), torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="iy is on cpu but image is on cuda"):
        ext(image.cuda(), iy, wy.cuda(), ix.cuda(), wx.cuda(), mean.cuda(), std.cuda(), 14, 2)
