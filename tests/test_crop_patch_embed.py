"""crop_patch_embed (torch and ext backends) against the stock path: transformers' PIL Qwen2-VL image
processor applied to `preprocess.cap_image(original.crop(box))`, with PIL's resampling.

The op rounds and clips each of its two resampling passes to an 8-bit level as PIL does, but
with float weights where PIL uses fixed-point ones, so pixels are compared before
normalization with a tolerance of 2/255 (max) and 0.5/255 (mean); where no resize happens
they must agree to float32 rounding. Images use the full 0..255 range, where bicubic
overshoot makes the clipping matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from op_cases import can_run, use_backend

from vpt_fast import spec
from vpt_fast.ops import crop_patch_embed, crop_patch_rows_torch, resample_tables
from vpt_fast.ops.crop_patch_embed import IMPLEMENTATIONS, _cap_steps
from vpt_fast.preprocess import CLIP_MEAN, CLIP_STD, cap_image, smart_resize

LO, HI = 0, 255  # full range: bicubic overshoot is clipped as PIL clips it
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
MEAN = torch.tensor(CLIP_MEAN)[None, :, None]
STD = torch.tensor(CLIP_STD)[None, :, None]
# measured |ours - stock| in uint8 levels, per case: printed at the end with `pytest -s`
MEASURED: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module")
def processor():
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if MEASURED:
        worst = max(v[0] for v in MEASURED.values())
        print(f"\ncrop_patch_embed vs PIL, uint8 levels (max, mean): worst max {worst:.3f}")
        for case, (mx, mean) in sorted(MEASURED.items()):
            print(f"  {case}: {mx:.3f} {mean:.4f}")


def _image(height: int, width: int, seed: int, kind: str, lo: int = LO, hi: int = HI) -> np.ndarray:
    """uint8 (H, W, 3) in lo..hi: "smooth" (low-frequency pattern plus mild noise) or "noise"."""
    gen = np.random.default_rng(seed)
    if kind == "noise":
        return gen.integers(lo, hi + 1, (height, width, 3), dtype=np.uint8)
    coarse = gen.random((height // 40 + 2, width // 40 + 2, 3))
    pattern = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR))
    yy, xx = np.mgrid[0:height, 0:width]
    waves = np.sin(xx / 7.3 + 3 * np.cos(yy / 31.0))[..., None] * 0.25
    values = pattern / 255.0 * 0.6 + waves + 0.2 + gen.normal(0, 0.04, (height, width, 3))
    return (lo + np.clip(values, 0, 1) * (hi - lo)).round().astype(np.uint8)


def _stock(processor, original: np.ndarray, box, max_side: int = 512):
    capped = cap_image(Image.fromarray(original).crop(box), max_side)
    out = processor(capped, return_tensors="pt")
    out_hw = smart_resize(capped.height, capped.width, 28, MIN_PIXELS, MAX_PIXELS)
    return out["pixel_values"], out["image_grid_thw"], out_hw


def _unnormalized(rows: torch.Tensor, frame: int = 0) -> torch.Tensor:
    """(N, 3, 196) pixel values in 0..1 of one temporal frame of processor rows (N, 1176)."""
    return rows.view(rows.shape[0], 3, 2, 196)[:, :, frame] * STD + MEAN


CASES = {
    # name: (image height, width, box (or None: the whole image), max_side)
    "grid cell": (600, 800, spec.region_box((3, 2, 3, 2), 800, 600), 512),
    "grid cells 2x3": (480, 640, spec.region_box((1, 4, 3, 5), 640, 480), 512),
    "right border": (300, 400, (250, 120, 400, 300), 512),
    "top-left border": (300, 400, (0, 0, 97, 61), 512),
    "whole image": (224, 336, None, 512),
    "whole odd image": (253, 391, None, 512),
    "big image (cap)": (900, 1500, None, 512),
    "big crop (cap)": (900, 1500, (31, 17, 1413, 860), 512),
    "tall thin crop (min side)": (700, 500, (10, 10, 22, 650), 512),
    "wide thin crop (min side)": (400, 700, (5, 200, 690, 213), 512),
    "tiny crop": (100, 100, (40, 50, 45, 53), 512),
    "cap to a zero side": (4, 3000, None, 512),
    "aspect clamp": (28, 9000, None, 20000),
    "odd sizes": (333, 517, (7, 11, 290, 301), 512),
    "cap with exact nearest steps": (700, 600, (20, 30, 52, 543), 512),
}


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("kind", ["smooth", "noise"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_match_stock_processor(processor, monkeypatch, case, kind, backend):
    use_backend(monkeypatch, "crop_patch_rows", backend)
    height, width, box, max_side = CASES[case]
    box = box or (0, 0, width, height)
    original = _image(height, width, seed=len(case) * 7 + len(kind), kind=kind)
    stock, grid, out_hw = _stock(processor, original, box, max_side)
    ours = crop_patch_embed(torch.from_numpy(original), box, out_hw, max_side=max_side)
    assert grid.tolist() == [[1, out_hw[0] // 14, out_hw[1] // 14]]
    assert ours.shape == stock.shape and ours.dtype == torch.float32
    # the two temporal frames are the same picture
    assert torch.equal(ours.view(-1, 3, 2, 196)[:, :, 0], ours.view(-1, 3, 2, 196)[:, :, 1])
    diff = (_unnormalized(ours) - _unnormalized(stock)).abs() * 255
    MEASURED[f"{case}, {kind}, {backend}"] = (float(diff.max()), float(diff.mean()))
    worst = int(diff.argmax())
    assert float(diff.max()) <= 2.0, f"max |diff| {float(diff.max()):.3f}/255 at flat index {worst}"
    assert float(diff.mean()) <= 0.5, f"mean |diff| {float(diff.mean()):.4f}/255"


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("case", ["whole", "crop", "crop of a capped image"])
def test_rows_equal_stock_exactly_without_resize(processor, monkeypatch, case, backend):
    """Capped crop already at the processor's size (no NEAREST step, no BICUBIC resize): stock
    rounds nothing either, so the rows, layout included, agree to float32 rounding. Full 0..255
    range: without a resize nothing can overshoot."""
    height, width = {"whole": (84, 112), "crop": (200, 300), "crop of a capped image": (600, 900)}[case]
    box = {"whole": (0, 0, 112, 84), "crop": (17, 33, 17 + 140, 33 + 56), "crop of a capped image": (100, 20, 604, 384)}[case]
    original = _image(height, width, seed=5, kind="noise", lo=0, hi=255)
    stock, _, out_hw = _stock(processor, original, box)
    assert out_hw == (box[3] - box[1], box[2] - box[0])
    use_backend(monkeypatch, "crop_patch_rows", backend)
    ours = crop_patch_embed(torch.from_numpy(original), box, out_hw)
    assert ours.shape == stock.shape
    err = (ours - stock).abs().max()
    assert float(err) <= 1e-6, f"max |diff| {float(err):.3g}"


# ----------------------------------------------------------------------------- resampling tables


def _coordinate_image(height: int, width: int, axis: int) -> np.ndarray:
    """RGB image whose pixels hold their own row (axis 0) or column (axis 1), base 256."""
    v = np.mgrid[0:height, 0:width][axis]
    return np.stack([v & 255, (v >> 8) & 255, v >> 16], axis=-1).astype(np.uint8)


def _sources(original_size: tuple[int, int], box, max_side: int = 512):
    """(capped image size, original row of each capped row, original column of each capped column)."""
    found = []
    for axis in (0, 1):
        capped = cap_image(Image.fromarray(_coordinate_image(*original_size, axis)).crop(box), max_side)
        a = np.asarray(capped).astype(np.int64)
        a = a[:, 0] if axis == 0 else a[0]
        found.append(a[:, 0] | (a[:, 1] << 8) | (a[:, 2] << 16))
    return capped.size, found[0], found[1]


@pytest.mark.parametrize("height,width,box,max_side", [
    (900, 1500, (0, 0, 1500, 900), 512),
    (1500, 900, (0, 0, 900, 1500), 512),
    (700, 600, (20, 30, 52, 543), 512),  # 32 -> 31 columns: PIL's running position
    (700, 500, (10, 10, 22, 650), 512),
    (4, 3000, (0, 0, 3000, 4), 512),
    (28, 9000, (0, 0, 9000, 28), 20000),
    (40, 3000, (100, 3, 2900, 20), 512),
])
def test_nearest_chain_reads_the_pixels_pil_reads(height, width, box, max_side):
    """With out_hw = the capped size the tables are the NEAREST chain alone (one tap, weight
    1): they must name, for every capped row/column, the original pixel cap_image took."""
    (capped_w, capped_h), rows, cols = _sources((height, width), box, max_side)
    assert (capped_w, capped_h) == _cap_steps(box[2] - box[0], box[3] - box[1], max_side)[-1]
    iy, wy, ix, wx = resample_tables(height, width, box, (capped_h, capped_w), max_side)
    assert iy.shape == (capped_h, 1) and ix.shape == (capped_w, 1)
    assert bool((wy == 1).all()) and bool((wx == 1).all())
    np.testing.assert_array_equal(iy[:, 0].numpy(), rows)
    np.testing.assert_array_equal(ix[:, 0].numpy(), cols)


def test_nearest_chain_follows_pil_not_the_closed_form():
    """PIL's NEAREST steps a running float64 position; the closed form int((x + 0.5) * in / out)
    differs where the exact position is an integer (here 32 -> 31 columns, x = 15)."""
    box = (20, 30, 52, 543)
    (capped_w, capped_h), _, cols = _sources((700, 600), box)
    assert capped_w == 31
    closed_form = np.array([box[0] + int((x + 0.5) * 32 / 31) for x in range(31)])
    assert (closed_form != cols).any()
    _, _, ix, _ = resample_tables(700, 600, box, (capped_h, capped_w))
    np.testing.assert_array_equal(ix[:, 0].numpy(), cols)


@pytest.mark.parametrize("in_size,out_size", [(307, 308), (512, 504), (28, 56), (5040, 5040), (1000, 28), (31, 280)])
def test_bicubic_taps(in_size, out_size):
    """One axis of the tables: weights sum to 1, taps inside the box, unused taps weigh 0."""
    x0 = 11
    iy, wy, ix, wx = resample_tables(in_size + 40, 60, (3, x0, 59, x0 + in_size), (out_size, 56), max_side=10**6)
    assert iy.dtype == ix.dtype == torch.int32 and wy.dtype == wx.dtype == torch.float32
    assert iy.shape == wy.shape and iy.shape[0] == out_size
    torch.testing.assert_close(wy.sum(1), torch.ones(out_size), atol=1e-6, rtol=0)
    assert int(iy.min()) >= x0 and int(iy.max()) < x0 + in_size
    scale = max(in_size / out_size, 1)
    assert iy.shape[1] <= 2 * int(np.ceil(2 * scale)) + 1
    if in_size == out_size:
        assert iy.shape[1] == 1 and torch.equal(iy[:, 0], torch.arange(x0, x0 + in_size, dtype=torch.int32))


# ----------------------------------------------------------------------------- embeddings


def _conv3d(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The vision tower's PatchEmbed: Conv3d, kernel = stride = (2, 14, 14), on processor rows."""
    return F.conv3d(rows.view(-1, 3, 2, 14, 14), weight).flatten(1)


def _patch_weight(embed_dim: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(embed_dim, 3, 2, 14, 14, generator=gen) * 0.02


def test_embeddings_match_conv3d_on_stock_rows(processor):
    """No resize: the stock rows equal ours, so Conv3d on them is the reference (fp32, 1e-4 of
    the output scale)."""
    original = _image(200, 300, seed=3, kind="noise", lo=0, hi=255)
    box = (17, 33, 17 + 140, 33 + 84)
    stock, _, out_hw = _stock(processor, original, box)
    weight = _patch_weight()
    ours = crop_patch_embed(torch.from_numpy(original), box, out_hw, weight=weight)
    expected = _conv3d(stock, weight)
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    scale = float(expected.abs().max())
    assert float((ours - expected).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("case", ["grid cell", "big image (cap)", "aspect clamp"])
def test_embeddings_match_conv3d_on_resized_rows(case):
    height, width, box, max_side = CASES[case]
    box = box or (0, 0, width, height)
    original = torch.from_numpy(_image(height, width, seed=11, kind="smooth"))
    capped_w, capped_h = _cap_steps(box[2] - box[0], box[3] - box[1], max_side)[-1]
    out_hw = smart_resize(capped_h, capped_w, 28, MIN_PIXELS, MAX_PIXELS)
    weight = _patch_weight(seed=1)
    rows = crop_patch_embed(original, box, out_hw, max_side=max_side)
    ours = crop_patch_embed(original, box, out_hw, weight=weight, max_side=max_side)
    expected = _conv3d(rows, weight)
    assert float((ours - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


BF16_FACTOR = 3.0  # bf16 embeddings: error vs fp32 at most 3x that of Conv3d run in bf16


def test_embeddings_bf16_weight():
    """A bf16 weight gives bf16 embeddings whose error against the fp32 computation (same bf16
    weight values, fp32 arithmetic) is at most BF16_FACTOR times the error of the Conv3d itself
    run in bf16."""
    height, width, box, _ = CASES["odd sizes"]
    original = torch.from_numpy(_image(height, width, seed=2, kind="smooth"))
    capped_w, capped_h = _cap_steps(box[2] - box[0], box[3] - box[1], 512)[-1]
    out_hw = smart_resize(capped_h, capped_w, 28, MIN_PIXELS, MAX_PIXELS)
    weight = _patch_weight(embed_dim=64, seed=4).to(torch.bfloat16)
    rows = crop_patch_embed(original, box, out_hw)
    exact = _conv3d(rows.double(), weight.double())
    baseline = (_conv3d(rows.to(torch.bfloat16), weight).double() - exact).abs().max()
    ours = crop_patch_embed(original, box, out_hw, weight=weight)
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    err = (ours.double() - exact).abs().max()
    assert float(err) <= BF16_FACTOR * float(baseline), f"bf16 error {float(err):.3g} vs Conv3d-in-bf16 {float(baseline):.3g}"


# ----------------------------------------------------------------------------- errors


def _ok():
    return dict(image=torch.zeros(60, 80, 3, dtype=torch.uint8), box=(0, 0, 80, 60), out_hw=(56, 84))


ERRORS = {
    "float image": (TypeError, r"uint8 tensor.*float32", dict(image=torch.zeros(60, 80, 3))),
    "numpy image": (TypeError, r"uint8 tensor.*ndarray", dict(image=np.zeros((60, 80, 3), np.uint8))),
    "CHW image": (ValueError, r"\(H, W, 3\).*\(3, 60, 80\)", dict(image=torch.zeros(3, 60, 80, dtype=torch.uint8))),
    "RGBA image": (ValueError, r"\(H, W, 3\).*\(60, 80, 4\)", dict(image=torch.zeros(60, 80, 4, dtype=torch.uint8))),
    "non-contiguous image": (ValueError, "contiguous", dict(image=torch.zeros(80, 60, 3, dtype=torch.uint8).transpose(0, 1))),
    "box outside": (ValueError, r"outside the 80x60 image", dict(box=(10, 10, 81, 50))),
    "negative box": (ValueError, r"outside the 80x60 image", dict(box=(-1, 0, 10, 10))),
    "empty box": (ValueError, r"box \(10, 10, 10, 50\) is empty", dict(box=(10, 10, 10, 50))),
    "float box": (TypeError, "four integers", dict(box=(0.5, 0, 10, 10))),
    "short box": (TypeError, "four integers", dict(box=(0, 0, 10))),
    "out_hw not multiple": (ValueError, r"multiples of 28.*\(56, 70\)", dict(out_hw=(56, 70))),
    "out_hw zero": (ValueError, "out_hw must be positive", dict(out_hw=(0, 28))),
    "out_hw 3 values": (ValueError, r"\(height, width\)", dict(out_hw=(28, 28, 28))),
    "weight shape": (ValueError, r"\(E, 3, 2, 14, 14\).*\(16, 3, 14, 14\)", dict(weight=torch.zeros(16, 3, 14, 14))),
    "weight temporal": (ValueError, r"\(E, 3, 2, 14, 14\).*\(16, 3, 1, 14, 14\)", dict(weight=torch.zeros(16, 3, 1, 14, 14))),
    "integer weight": (TypeError, "floating point", dict(weight=torch.zeros(16, 3, 2, 14, 14, dtype=torch.int32))),
    "weight device": (ValueError, "weight is on meta", dict(weight=torch.zeros(16, 3, 2, 14, 14, device="meta"))),
    "mean length": (ValueError, "mean must hold 3 values", dict(mean=(0.5, 0.5))),
    "std length": (ValueError, "std must hold 3 values", dict(std=(0.5, 0.5, 0.5, 0.5))),
    "patch size": (ValueError, "patch_size must be positive", dict(patch_size=0)),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(case):
    error, match, changes = ERRORS[case]
    args = {**_ok(), **changes}
    with pytest.raises(error, match=match):
        crop_patch_embed(args.pop("image"), args.pop("box"), args.pop("out_hw"), **args)


def test_pass_order_follows_pillow():
    """Pillow 13 starts with its vertical pass when the height shrinks by more than twice the width;
    the op must nest its rounded sums the same way, on every backend."""
    from vpt_fast.ops.crop_patch_embed import pil_vertical_first

    gen = torch.Generator().manual_seed(11)
    image = torch.randint(0, 256, (90, 70, 3), dtype=torch.uint8, generator=gen)
    box = (3, 1, 70, 90)  # 67x89 -> 56x28: height shrinks far more than width
    iy, wy, ix, wx = resample_tables(90, 70, box, (28, 56))
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    import PIL

    assert pil_vertical_first((89, 67), (28, 56)) == (int(PIL.__version__.split(".")[0]) >= 13)
    assert not pil_vertical_first((28, 56), (56, 112))
    ordered = {vf: crop_patch_rows_torch(image, iy, wy, ix, wx, mean, std, 14, 2, vf) for vf in (False, True)}
    assert not torch.equal(ordered[False], ordered[True])  # the order is visible on full-range content
    stock, _, out_hw = _stock(Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), image.numpy(), box)
    ours = crop_patch_embed(image, box, out_hw)
    diff = (_unnormalized(ours) - _unnormalized(stock)).abs() * 255
    assert float(diff.max()) <= 2.0 and float(diff.mean()) <= 0.5
    for backend in ("ext", "triton"):
        if can_run("crop_patch_rows", backend) is not True:
            continue
        for vf in (False, True):
            got = IMPLEMENTATIONS[backend](image, iy, wy, ix, wx, mean, std, 14, 2, vf)
            assert (got - ordered[vf]).abs().max() <= 1e-5, (backend, vf)
