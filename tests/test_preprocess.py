"""vpt_fast.preprocess against hand-computed rules and transformers' stock PIL processors."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vpt_fast.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    QwenImageConfig,
    VPTImageProcessor,
    cap_image,
    crop_image,
    dino_pixels,
    load_image,
    qwen_image_inputs,
    qwen_patchify,
    qwen_resize_normalize,
    sam_pixels,
    smart_resize,
    to_rgb,
)

transformers = pytest.importorskip("transformers")
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as stock_qwen  # noqa: E402
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil  # noqa: E402

SIZES = [(37, 61), (333, 517), (640, 480), (1, 1), (10000, 10), (10, 10000), (30, 7000)]
MODES = ["RGB", "L", "LA", "RGBA", "P", "I;16"]


def random_image(width, height, mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    if mode == "RGB":
        return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.randint(0, 256, (height, width, 4), dtype=np.uint8))
    if mode == "L":
        return Image.fromarray(rng.randint(0, 256, (height, width), dtype=np.uint8))
    if mode == "LA":
        bands = [Image.fromarray(rng.randint(0, 256, (height, width), dtype=np.uint8)) for _ in "LA"]
        return Image.merge("LA", bands)
    if mode == "P":
        index = rng.randint(0, 256, (height, width), dtype=np.uint8)
        image = Image.frombytes("P", (width, height), index.tobytes())
        image.putpalette(rng.randint(0, 256, 768, dtype=np.uint8).tobytes())
        return image
    if mode == "I;16":
        return Image.fromarray(rng.randint(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I;16B":
        values = rng.randint(0, 65536, (height, width), dtype=np.uint16)
        return Image.frombytes("I;16B", (width, height), values.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(rng.randint(-5000, 70000, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-3.0, 8.0, (height, width)).astype(np.float32))
    raise AssertionError(mode)


def capped_cases():
    """(label, capped RGB image) over the odd sizes and the modes."""
    cases = []
    for i, (w, h) in enumerate(SIZES):
        mode = MODES[i % len(MODES)]
        cases.append((f"{w}x{h}-{mode}", cap_image(random_image(w, h, mode, seed=i))))
    for j, mode in enumerate(MODES):
        cases.append((f"45x29-{mode}", cap_image(random_image(45, 29, mode, seed=100 + j))))
    return cases


CAPPED = capped_cases()


def assert_close(ours, ref, what, tol=1e-5):
    ours = np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    assert diff <= tol, f"{what}: max abs diff {diff}"


# ---------------------------------------------------------------- RGB conversion


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_to_rgb_matches_pil_convert(mode):
    image = random_image(23, 17, mode, seed=3)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


def test_to_rgb_keeps_rgb_object():
    image = random_image(5, 4)
    assert to_rgb(image) is image


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_to_rgb_sixteen_bit_keeps_high_byte(mode):
    image = random_image(19, 11, mode, seed=4)
    values = np.asarray(image).astype(np.uint16)
    out = np.asarray(to_rgb(image))
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_to_rgb_wide_modes_rescale_min_max(mode):
    image = random_image(19, 11, mode, seed=5)
    values = np.asarray(image).astype(np.float64)
    out = np.asarray(to_rgb(image))
    low, high = values.min(), values.max()
    expected = np.rint((values - low) * 255.0 / (high - low)).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 1], expected)
    assert out[values == low].max() == 0 and out[values == high].min() == 255


def test_to_rgb_constant_wide_image_is_black():
    image = Image.fromarray(np.full((3, 4), 7.5, dtype=np.float32))
    assert np.asarray(to_rgb(image)).max() == 0


# ---------------------------------------------------------------- capping


@pytest.mark.parametrize(
    "size, max_side, expected",
    [
        ((1024, 768), 512, (512, 384)),
        ((333, 517), 512, (329, 512)),  # int(333 * 512 / 517) = 329
        ((333, 500), 512, (333, 500)),
        ((640, 480), 512, (512, 384)),
        ((37, 61), 512, (37, 61)),
        ((1, 1), 512, (28, 28)),
        ((10000, 10), 512, (512, 28)),  # shrink gives (512, 0) -> kept at 1 -> grown to 28
        ((10, 10000), 512, (28, 512)),
        ((30, 7000), 512, (28, 512)),  # (int(2.19), 512) = (2, 512) -> (28, 512)
        ((9000, 28), 20000, (28 * 180, 28)),  # aspect 321 > 200 -> clamped to 180
        ((28, 9000), 20000, (28, 28 * 180)),
        ((6000, 20), 20000, (28 * 180, 28)),  # grown to (6000, 28) first, then clamped
        ((5600, 28), 20000, (5600, 28)),  # aspect exactly 200 is kept
    ],
)
def test_cap_image_sizes(size, max_side, expected):
    out = cap_image(random_image(*size, mode="L", seed=6), max_side)
    assert out.mode == "RGB"
    assert out.size == expected


@pytest.mark.parametrize("mode", MODES + ["I;16B", "I", "F"])
def test_cap_image_always_rgb(mode):
    out = cap_image(random_image(700, 13, mode, seed=7))
    assert out.mode == "RGB" and out.size == (512, 28)


def test_cap_image_resizes_before_converting():
    image = random_image(1024, 600, "RGBA", seed=8)
    expected = image.resize((512, 300), Image.Resampling.NEAREST).convert("RGB")
    np.testing.assert_array_equal(np.asarray(cap_image(image)), np.asarray(expected))


def test_cap_image_keeps_small_rgb_pixels():
    image = random_image(333, 500, seed=9)
    np.testing.assert_array_equal(np.asarray(cap_image(image)), np.asarray(image))


# ---------------------------------------------------------------- smart_resize


def test_smart_resize_matches_stock():
    rng = np.random.RandomState(10)
    sizes = [(1, 1), (28, 28), (56, 56), (27, 5400), (5400, 27), (13000, 11000), (4, 800)]
    while len(sizes) < 600:
        h, w = (int(v) for v in np.exp(rng.uniform(0, math.log(20000), 2)))
        h, w = max(h, 1), max(w, 1)
        if max(h, w) / min(h, w) <= 200:
            sizes.append((h, w))
    for min_pixels, max_pixels in [(3136, 1003520), (3136, 12845056), (3136, 50176), (200704, 1003520)]:
        for h, w in sizes:
            ours = smart_resize(h, w, 28, min_pixels, max_pixels)
            ref = stock_qwen.smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
            assert ours == tuple(ref), f"{h}x{w} min={min_pixels} max={max_pixels}: {ours} != {ref}"


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="aspect ratio"):
        stock_qwen.smart_resize(10, 2010)


# ---------------------------------------------------------------- Qwen2-VL


def stock_qwen_processor(max_pixels, min_pixels=3136):
    # Both limits are always passed: the stock constructor writes them into its class-level
    # `size` dict, so an omitted one would come from whichever instance was built before.
    return stock_qwen.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


@pytest.mark.parametrize("max_pixels", [50176, 1003520, 12845056])
@pytest.mark.parametrize("label, image", CAPPED, ids=[c[0] for c in CAPPED])
def test_qwen_matches_stock(label, image, max_pixels):
    cfg = QwenImageConfig(max_pixels=max_pixels)
    pixel_values, grid = qwen_image_inputs([image], cfg)
    ref = stock_qwen_processor(max_pixels)(image, return_tensors="np")
    assert pixel_values.dtype == torch.float32 and grid.dtype == torch.long
    np.testing.assert_array_equal(grid.numpy(), ref["image_grid_thw"])
    assert_close(pixel_values, ref["pixel_values"], f"qwen {label}")


def test_qwen_batch_and_large_image_match_stock():
    images = [c[1] for c in CAPPED[:4]] + [random_image(1500, 1100, seed=11)]
    cfg = QwenImageConfig()
    pixel_values, grid = qwen_image_inputs(images, cfg)
    ref = stock_qwen_processor(cfg.max_pixels)(images, return_tensors="np")
    np.testing.assert_array_equal(grid.numpy(), ref["image_grid_thw"])
    assert_close(pixel_values, ref["pixel_values"], "qwen batch")
    assert pixel_values.shape == (int(grid.prod(-1).sum()), 1176)


def test_qwen_resize_normalize_shape_and_no_resize_when_aligned():
    image = random_image(56, 84, seed=12)
    pixels = qwen_resize_normalize(image, QwenImageConfig())
    assert pixels.shape == (3, 84, 56)
    raw = np.asarray(image).astype(np.float64) / 255
    expected = (raw - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert_close(pixels.permute(1, 2, 0), expected, "normalize")


def test_qwen_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        qwen_resize_normalize(random_image(56, 56, "L"), QwenImageConfig())


def test_patchify_layout():
    cfg = QwenImageConfig()
    channels, height, width = 3, 28, 56
    c, y, x = np.meshgrid(np.arange(channels), np.arange(height), np.arange(width), indexing="ij")
    pixels = torch.tensor(c * 10000 + y * 100 + x, dtype=torch.float32)
    rows, grid = qwen_patchify(pixels, cfg)
    assert grid.tolist() == [[1, 2, 4]]
    assert rows.shape == (8, 3 * 2 * 14 * 14)
    merged_w = 4 // 2
    for ci in range(channels):
        for yi in range(height):
            for xi in range(width):
                py, px = yi // 14, xi // 14
                row = ((py // 2 * merged_w + px // 2) * 2 + py % 2) * 2 + px % 2
                for t in range(2):
                    col = ((ci * 2 + t) * 14 + yi % 14) * 14 + xi % 14
                    assert rows[row, col] == ci * 10000 + yi * 100 + xi, (ci, yi, xi, t)


def test_patchify_matches_stock_layout():
    rng = np.random.RandomState(13)
    pixels = rng.standard_normal((3, 84, 112)).astype(np.float32)
    rows, _ = qwen_patchify(torch.from_numpy(pixels), QwenImageConfig())
    ref, gh, gw = stock_qwen_processor(1003520).patchify(pixels, 14, 2, 2)
    assert (gh, gw) == (6, 8)
    np.testing.assert_array_equal(rows.numpy(), ref)


def test_patchify_rejects_unaligned():
    with pytest.raises(ValueError, match="multiple of 28"):
        qwen_patchify(torch.zeros(3, 28, 42), QwenImageConfig())


# ---------------------------------------------------------------- config


def test_config_from_hub_style_dict():
    d = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    cfg = QwenImageConfig.from_dict(d)
    assert cfg == QwenImageConfig(max_pixels=12845056)


def test_config_size_spellings():
    assert QwenImageConfig.from_dict({"size": {"min_pixels": 10, "max_pixels": 20}}).max_pixels == 20
    cfg = QwenImageConfig.from_dict({"size": {"shortest_edge": 11, "longest_edge": 21}})
    assert (cfg.min_pixels, cfg.max_pixels) == (11, 21)
    cfg = QwenImageConfig.from_dict({"max_pixels": 30, "size": {"shortest_edge": 11, "longest_edge": 21}})
    assert (cfg.min_pixels, cfg.max_pixels) == (11, 30)
    assert QwenImageConfig.from_dict({}) == QwenImageConfig()
    with pytest.raises(ValueError, match="do_normalize"):
        QwenImageConfig.from_dict({"do_normalize": False})


def test_config_to_dict_round_trip_and_loads_in_transformers():
    cfg = QwenImageConfig(max_pixels=28 * 28 * 300)
    d = cfg.to_dict()
    assert QwenImageConfig.from_dict(d) == cfg
    assert d["image_processor_type"] == "Qwen2VLImageProcessor" and d["resample"] == 3
    loaded = stock_qwen.Qwen2VLImageProcessorPil.from_dict(
        {k: v for k, v in d.items() if k != "image_processor_type"}
    )
    assert (loaded.size["shortest_edge"], loaded.size["longest_edge"]) == (cfg.min_pixels, cfg.max_pixels)
    image = random_image(500, 400, seed=14)
    ref = loaded(image, return_tensors="np")
    pixel_values, grid = qwen_image_inputs([image], cfg)
    np.testing.assert_array_equal(grid.numpy(), ref["image_grid_thw"])
    assert_close(pixel_values, ref["pixel_values"], "qwen from to_dict")


# ---------------------------------------------------------------- DINOv2 and SAM


def test_dino_matches_stock():
    images = [c[1] for c in CAPPED]
    ours = dino_pixels(images)
    stock = BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    ref = stock(images, return_tensors="np")["pixel_values"]
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    for i, (label, _) in enumerate(CAPPED):
        assert_close(ours[i], ref[i], f"dino {label}")


def test_sam_matches_stock():
    images = [
        cap_image(random_image(37, 61, "P", seed=15), 1024),
        cap_image(random_image(1300, 977, "RGB", seed=16), 1024),
        cap_image(random_image(30, 7000, "LA", seed=17), 1024),
        random_image(1300, 977, "RGB", seed=16),  # uncapped: the SAM resize itself rounds
    ]
    pixel_values, original, reshaped = sam_pixels(images)
    stock = SamImageProcessorPil(
        size={"longest_edge": 1024},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_pad=True,
        pad_size={"height": 1024, "width": 1024},
        do_convert_rgb=True,
    )
    ref = stock(images, return_tensors="np")
    assert pixel_values.shape == (4, 3, 1024, 1024)
    assert_close(pixel_values, ref["pixel_values"], "sam")
    np.testing.assert_array_equal(original.numpy(), np.asarray(ref["original_sizes"]))
    np.testing.assert_array_equal(reshaped.numpy(), np.asarray(ref["reshaped_input_sizes"]))
    # cap_image already truncated 977 * 1024 / 1300 = 769.6 to 769; the SAM resize keeps it.
    assert reshaped.tolist()[1] == [769, 1024]
    assert reshaped.tolist()[3] == [770, 1024]  # int(769.6 + 0.5)
    assert torch.count_nonzero(pixel_values[1, :, 769:]) == 0
    assert torch.count_nonzero(pixel_values[0, :, :, 621:]) == 0


# ---------------------------------------------------------------- loading, crops, the bundle


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "picture.png"
    random_image(900, 700, "P", seed=18).save(path)
    return path


def test_load_image_keeps_mode_and_size(image_file, tmp_path):
    loaded = load_image(image_file)
    assert loaded.mode == "P" and loaded.size == (900, 700)
    deep = tmp_path / "deep.png"
    random_image(31, 9, "I;16", seed=19).save(deep)
    assert load_image(str(deep)).mode.startswith("I;16")
    pil = random_image(3, 2, "LA")
    assert load_image(pil) is pil


def test_load_image_errors(tmp_path):
    missing = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_image(missing)
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture\n")
    with pytest.raises(ValueError, match=re.escape(str(fake)) + ".*not an image file"):
        load_image(str(fake))
    with pytest.raises(TypeError, match="int"):
        load_image(42)


def test_crop_image_validation():
    image = random_image(40, 30, seed=20)
    assert crop_image(image, (1, 2, 11, 22)).size == (10, 20)
    assert crop_image(image, np.array([0, 0, 40, 30])).size == (40, 30)
    for box in [(0, 0, 41, 30), (-1, 0, 10, 10), (5, 5, 5, 10), (10, 5, 4, 10), (0, 0, 10, 31)]:
        with pytest.raises(ValueError, match=r"40x30"):
            crop_image(image, box)
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        crop_image(image, (0, 0, 10))


def test_processor_bundle(image_file):
    proc = VPTImageProcessor(qwen=QwenImageConfig(max_pixels=12845056))
    prepared = proc.prepare(image_file)
    assert prepared.mode == "RGB" and prepared.size == (512, 398)

    from_path = proc.qwen_inputs(image_file)
    from_pil = proc.qwen_inputs([load_image(image_file)])
    assert torch.equal(from_path[0], from_pil[0]) and torch.equal(from_path[1], from_pil[1])
    ref = stock_qwen_processor(12845056)(prepared, return_tensors="np")
    assert_close(from_path[0], ref["pixel_values"], "bundle qwen")

    assert proc.dino_inputs([image_file, prepared]).shape == (2, 3, 224, 224)
    sam = proc.sam_inputs(image_file)
    assert sam.shape == (1, 3, 1024, 1024)
    sam_capped = cap_image(load_image(image_file), 1024)
    assert torch.equal(sam, sam_pixels([sam_capped])[0])


def test_crop_inputs_use_the_original_image(image_file):
    proc = VPTImageProcessor()
    original = load_image(image_file)
    boxes = [(100, 50, 700, 650), (0, 0, 13, 700), (880, 690, 900, 700)]
    pixel_values, grid = proc.crop_inputs(image_file, boxes)
    crops = [cap_image(original.crop(box)) for box in boxes]
    ref = stock_qwen_processor(proc.qwen.max_pixels)(crops, return_tensors="np")
    np.testing.assert_array_equal(grid.numpy(), ref["image_grid_thw"])
    assert_close(pixel_values, ref["pixel_values"], "crops")
    # 600x600 -> capped 512x512 -> 504x504; a crop of the 512-capped picture would be smaller.
    # 13x700 -> (9, 512) -> (28, 512) -> 28x504; 20x10 -> 28x28 -> 56x56 (min_pixels).
    assert grid.tolist() == [[1, 36, 36], [1, 36, 2], [1, 4, 4]]
    with pytest.raises(ValueError, match="900x700"):
        proc.crop_inputs(image_file, [(0, 0, 901, 10)])
