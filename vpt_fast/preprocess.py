"""Image preprocessing of docs/vpt.md §8: capping, Qwen2-VL, DINOv2 and SAM inputs.

The reference path runs on the CPU with PIL and numpy. Every step reproduces the arithmetic of the
stock image processors (PIL resampling on uint8 images, rescale in float64 then cast to float32,
normalize in float32) so the outputs agree with them bit for bit or within float32 rounding.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Capping rules of the reference evaluation (docs/vpt.md §8, step 1).
MIN_SIDE = 28
MAX_ASPECT = 200
CLAMPED_ASPECT = 180

DINO_RESIZE_SHORT = 256
DINO_CROP = 224
SAM_SIZE = 1024

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_WIDE_MODES = ("I", "F")


def load_image(image: Any) -> Image.Image:
    """Open a path (or take a PIL image) and load its pixels; mode and size are left unchanged.

    Raises FileNotFoundError for a missing file, TypeError for something that is neither a
    path nor a PIL image, and ValueError (naming the file) for data PIL cannot decode, an
    image over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, twice over) and
    an image with a side of 0 pixels.
    """
    if isinstance(image, Image.Image):
        _check_size(image, "the image")
        image.load()
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a path or a PIL image, got {type(image).__name__}")
    path = os.fspath(image)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not an image file")
    try:
        opened = Image.open(path)
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path}: not an image file PIL can read") from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path}: refused ({exc})") from exc
    with opened:
        _check_size(opened, path)
        try:
            opened.load()
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{path}: refused ({exc})") from exc
        except MemoryError:
            raise
        except Exception as exc:
            # Truncated or corrupt data surfaces only while decoding, as whatever the decoder
            # raises (OSError, SyntaxError, EOFError, struct.error, ...).
            raise ValueError(f"{path}: not an image file PIL can read ({type(exc).__name__}: {exc})") from exc
    return opened


def _check_size(image: Image.Image, what: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{what} is {width}x{height} pixels: both sides must be at least 1 pixel")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB like ``image.convert("RGB")``, except for wide integer and float modes.

    PIL's conversion clips "I;16*", "I" and "F" pixels at 255, which turns most of such an image
    white. Instead: 16-bit modes keep their high byte (value >> 8); "I" and "F" are rescaled
    linearly from their min..max to 0..255 and rounded (a constant image becomes black). The
    result is then expanded to grey RGB. An RGB image is returned as is.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in _WIDE_MODES:
        values = np.asarray(image).astype(np.float64)
        low, high = float(values.min()), float(values.max())
        if high > low:
            grey = np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
        else:
            grey = np.zeros(values.shape, dtype=np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def cap_image(image: Image.Image, max_side: int = 512) -> Image.Image:
    """Apply the capping rules of docs/vpt.md §8, step 1 and return an RGB image.

    In order: shrink (NEAREST) so the longer side is at most ``max_side``, each side becoming
    ``int(side * r)`` with ``r = max_side / longer_side`` (this float order is the published one);
    convert with :func:`to_rgb`; grow (NEAREST) any side
    below 28 to 28; if one side is more than 200 times the other, resize (NEAREST) the longer one to
    180 times the shorter. Unlike the published code, a side that the shrink would make 0 (e.g.
    10000x10) is kept at 1 pixel, where the published code fails.
    """
    width, height = image.size
    longer = max(width, height)
    if longer > max_side:
        ratio = max_side / longer
        image = image.resize(
            (max(1, int(width * ratio)), max(1, int(height * ratio))), Image.Resampling.NEAREST
        )
    image = to_rgb(image)
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)
        image = image.resize((width, height), Image.Resampling.NEAREST)
    if width / height > MAX_ASPECT:
        image = image.resize((height * CLAMPED_ASPECT, height), Image.Resampling.NEAREST)
    elif height / width > MAX_ASPECT:
        image = image.resize((width, width * CLAMPED_ASPECT), Image.Resampling.NEAREST)
    return image


def crop_image(image: Image.Image, box: Sequence[int]) -> Image.Image:
    """Crop ``box = (x0, y0, x1, y1)`` (integer pixel edges) from ``image``; the box must lie inside."""
    if len(box) != 4:
        raise ValueError(f"crop box must be (x0, y0, x1, y1), got {tuple(box)!r}")
    x0, y0, x1, y1 = (operator.index(v) for v in box)
    width, height = image.size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"crop box {(x0, y0, x1, y1)} is empty or outside the {width}x{height} image"
        )
    return image.crop((x0, y0, x1, y1))


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Qwen2-VL target size: multiples of ``factor``, pixel count within [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT:
        raise ValueError(f"absolute aspect ratio must be at most {MAX_ASPECT}, got {aspect}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenImageConfig:
    """Settings of the Qwen2-VL image processor."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {value!r}")
        if not all(v > 0 for v in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std!r}")
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise ValueError(f"rescale_factor must be a positive number, got {self.rescale_factor!r}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_vision_config(cls, vision_config) -> "QwenImageConfig":
        """The processor settings a model's vision tower implies (patch, merge and temporal patch
        sizes), the others at their defaults: for a model given without its image processor."""
        return cls(patch_size=vision_config.patch_size, merge_size=vision_config.spatial_merge_size,
                   temporal_patch_size=vision_config.temporal_patch_size)

    @classmethod
    def from_dict(cls, d: dict) -> "QwenImageConfig":
        """Read a Qwen2-VL ``preprocessor_config.json`` dict; missing keys keep their defaults.

        Top-level ``min_pixels``/``max_pixels`` win over ``size`` (as in transformers), and
        ``size.min_pixels``/``max_pixels`` over ``size.shortest_edge``/``longest_edge``.
        """
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag) is False:
                raise ValueError(f"{flag}=False is not supported: the pipeline always applies it")
        if d.get("resample", Image.Resampling.BICUBIC) != Image.Resampling.BICUBIC:
            raise ValueError(f"only BICUBIC (3) resampling is supported, got {d['resample']}")
        size = d.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(f"size must be an object, got {size!r}")
        default = cls()

        def pick(*values: Any) -> Any:
            return next(v for v in values if v is not None)

        def floats(name: str) -> tuple[float, ...]:
            value = d.get(name, getattr(default, name))
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a list of 3 numbers, got {value!r}")
            try:
                return tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a list of 3 numbers, got {value!r}") from None

        rescale = d.get("rescale_factor", default.rescale_factor)
        if not isinstance(rescale, (int, float)) or isinstance(rescale, bool):
            raise ValueError(f"rescale_factor must be a positive number, got {rescale!r}")
        return cls(
            patch_size=d.get("patch_size", default.patch_size),
            merge_size=d.get("merge_size", default.merge_size),
            temporal_patch_size=d.get("temporal_patch_size", default.temporal_patch_size),
            min_pixels=pick(d.get("min_pixels"), size.get("min_pixels"), size.get("shortest_edge"), default.min_pixels),
            max_pixels=pick(d.get("max_pixels"), size.get("max_pixels"), size.get("longest_edge"), default.max_pixels),
            image_mean=floats("image_mean"),
            image_std=floats("image_std"),
            rescale_factor=float(rescale),
        )

    def to_dict(self) -> dict:
        """A ``preprocessor_config.json`` dict that transformers' Qwen2-VL processor loads.

        ``size`` carries both spellings (min/max_pixels and shortest/longest_edge) because
        transformers versions differ in which one they require.
        """
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": int(Image.Resampling.BICUBIC),
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {
                "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels,
                "shortest_edge": self.min_pixels,
                "longest_edge": self.max_pixels,
            },
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
        }


def _rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r} (use cap_image/to_rgb)")
    return np.asarray(image)


def _rescale_normalize(
    image: Image.Image, scale: float, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 RGB image -> float32 (3, H, W), rescaled in float64 and normalized in float32.

    This is the stock processors' order and precision, which keeps results bit-identical.
    """
    scaled = (_rgb_array(image).astype(np.float64) * scale).astype(np.float32)
    normed = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))


def qwen_resize_normalize(image_rgb: Image.Image, cfg: QwenImageConfig) -> torch.Tensor:
    """smart_resize (BICUBIC), rescale and normalize: float32 tensor (3, H', W')."""
    width, height = image_rgb.size
    new_h, new_w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (new_w, new_h) != (width, height):
        image_rgb = image_rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return _rescale_normalize(image_rgb, cfg.rescale_factor, cfg.image_mean, cfg.image_std)


def qwen_patchify(pixels: torch.Tensor, cfg: QwenImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (C, H', W') into Qwen2-VL rows and the grid (1, H'/p, W'/p).

    Each row is one p x p patch laid out as (C, T, p, p), the frame repeated T times; rows run
    over (t, h/m, w/m, m, m) so each m x m merge group is contiguous.
    """
    channels, height, width = pixels.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if height % cfg.factor or width % cfg.factor:
        raise ValueError(f"pixel size {height}x{width} is not a multiple of {cfg.factor}")
    grid_h, grid_w = height // p, width // p
    patches = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, p, p)
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)
    rows = patches.reshape(grid_h * grid_w, channels * t * p * p)
    grid = torch.tensor([[1, grid_h, grid_w]], dtype=torch.long)
    return rows, grid


def qwen_image_inputs(
    images_rgb_capped: Sequence[Image.Image], cfg: QwenImageConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` (sum N, C*T*p*p) float32 and ``image_grid_thw`` (n, 3) long for the images."""
    if len(images_rgb_capped) == 0:
        raise ValueError("no images given")
    rows, grids = zip(*(qwen_patchify(qwen_resize_normalize(im, cfg), cfg) for im in images_rgb_capped))
    return torch.cat(rows), torch.cat(grids)


def dino_pixels(images_rgb: Sequence[Image.Image]) -> torch.Tensor:
    """DINOv2 inputs (n, 3, 224, 224): shortest edge to 256 (BICUBIC), center crop, ImageNet norm."""
    if len(images_rgb) == 0:
        raise ValueError("no images given")
    out = []
    for image in images_rgb:
        width, height = image.size
        # Same rounding as transformers: the long side is int(256 * long / short).
        if width <= height:
            new_w, new_h = DINO_RESIZE_SHORT, int(DINO_RESIZE_SHORT * height / width)
        else:
            new_w, new_h = int(DINO_RESIZE_SHORT * width / height), DINO_RESIZE_SHORT
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - DINO_CROP) // 2, (new_w - DINO_CROP) // 2
        image = image.crop((left, top, left + DINO_CROP, top + DINO_CROP))
        out.append(_rescale_normalize(image, 1 / 255, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(out)


def sam_pixels(
    images_rgb: Sequence[Image.Image],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM inputs: longest side to 1024 (BILINEAR), ImageNet norm, zero-padded bottom/right.

    Returns ``pixel_values`` (n, 3, 1024, 1024) and the (height, width) before and after the resize
    as long tensors (n, 2).
    """
    if len(images_rgb) == 0:
        raise ValueError("no images given")
    pixel_values = torch.zeros(len(images_rgb), 3, SAM_SIZE, SAM_SIZE)
    original, reshaped = [], []
    for i, image in enumerate(images_rgb):
        width, height = image.size
        scale = SAM_SIZE * 1.0 / max(height, width)
        # Round half up on the scaled sides, as transformers does.
        new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        if min(new_h, new_w) == 0:
            raise ValueError(f"{width}x{height} image is too elongated for the SAM resize")
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        pixel_values[i, :, :new_h, :new_w] = _rescale_normalize(
            image, 1 / 255, IMAGENET_MEAN, IMAGENET_STD
        )
        original.append((height, width))
        reshaped.append((new_h, new_w))
    return pixel_values, torch.tensor(original), torch.tensor(reshaped)


@dataclass(frozen=True)
class PixelImage:
    """An image already made into Qwen2-VL patch rows, as a transformers processor returns
    them: `rows` is its part of `pixel_values` (t*h*w, C*T*p*p), `grid` its row of
    `image_grid_thw`. The engine feeds the rows to the vision tower as they are; `picture`
    (RGB) is what a perception crops or re-encodes."""

    rows: torch.Tensor
    grid: tuple[int, int, int]
    picture: Image.Image

    @classmethod
    def from_rows(cls, rows: torch.Tensor, grid: Sequence[int], cfg: QwenImageConfig,
                  picture: Image.Image | None = None) -> "PixelImage":
        """Check rows against grid and cfg; without `picture`, the image the rows were made
        from is recovered from them (its first temporal frame, de-normalized to 8 bits)."""
        t, h, w = (int(v) for v in grid)
        p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
        if t != 1 or h % m or w % m or h < 1 or w < 1:
            raise ValueError(f"image_grid_thw {[t, h, w]} is not a still image's grid (t = 1, h and w multiples of {m})")
        if rows.ndim != 2 or rows.shape != (h * w, 3 * tp * p * p):
            raise ValueError(f"pixel_values rows of shape {tuple(rows.shape)} for grid {[t, h, w]}: expected "
                             f"{(h * w, 3 * tp * p * p)} (patch size {p}, temporal patch size {tp})")
        if picture is None:
            picture = rows_to_picture(rows, (h, w), cfg)
        return cls(rows, (t, h, w), to_rgb(picture))


def rows_to_picture(rows: torch.Tensor, grid_hw: tuple[int, int], cfg: QwenImageConfig) -> Image.Image:
    """The RGB image behind Qwen2-VL patch rows (the inverse of `qwen_patchify` and the
    normalization, rounded to 8 bits)."""
    h, w = grid_hw
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    x = rows.detach().to("cpu", torch.float64).reshape(h // m, w // m, m, m, 3, tp, p, p)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)  # (C, h/m, m, p, w/m, m, p) -> (C, H, W)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float64)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float64)[:, None, None]
    values = ((x * std + mean) / cfg.rescale_factor).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _as_list(images: Any) -> list:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


@dataclass
class VPTImageProcessor:
    """All image inputs of a VPT model, from paths or PIL images."""

    qwen: QwenImageConfig = field(default_factory=QwenImageConfig)
    max_side: int = 512
    sam_max_side: int = 1024

    def prepare(self, image: Any) -> Image.Image:
        """Load and cap at ``max_side``: the RGB picture every branch starts from."""
        return cap_image(load_image(image), self.max_side)

    def qwen_inputs(self, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-VL ``pixel_values`` and ``image_grid_thw`` for one image or a list."""
        return qwen_image_inputs([self.prepare(im) for im in _as_list(images)], self.qwen)

    def crop_inputs(
        self, image: Any, boxes: Iterable[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-VL inputs of box crops taken from the original (uncapped) image, each then capped."""
        original = load_image(image)
        return qwen_image_inputs([self.prepare_crop(original, box) for box in boxes], self.qwen)

    def prepare_crop(self, image: Any, box: Sequence[int]) -> Image.Image:
        """One box cropped from the original (uncapped) image, then capped like any image."""
        return cap_image(crop_image(load_image(image), box), self.max_side)

    def grid_thw(self, capped: Image.Image | PixelImage) -> tuple[int, int, int]:
        """(t, h, w) patch grid the Qwen2-VL pipeline gives a capped image."""
        if isinstance(capped, PixelImage):
            return capped.grid
        height, width = smart_resize(
            capped.height, capped.width, self.qwen.factor, self.qwen.min_pixels, self.qwen.max_pixels
        )
        return 1, height // self.qwen.patch_size, width // self.qwen.patch_size

    def token_count(self, capped: Image.Image | PixelImage) -> int:
        """Number of `<|image_pad|>` tokens (merged visual tokens) of a capped image."""
        t, h, w = self.grid_thw(capped)
        return t * h * w // self.qwen.merge_size**2

    def dino_inputs(self, images: Any) -> torch.Tensor:
        """DINOv2 ``pixel_values`` (n, 3, 224, 224) of the capped images."""
        return dino_pixels([self.prepare(im) for im in _as_list(images)])

    def sam_inputs(self, images: Any) -> torch.Tensor:
        """SAM ``pixel_values`` (n, 3, 1024, 1024) of the images capped at ``sam_max_side``."""
        capped = [cap_image(load_image(im), self.sam_max_side) for im in _as_list(images)]
        return sam_pixels(capped)[0]
