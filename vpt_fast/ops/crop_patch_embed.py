"""crop_patch_embed: from the original image to Qwen2-VL patch rows (or patch embeddings) in one pass.

docs/vpt.md §8 as one sampler: crop the box, cap it (`preprocess.cap_image`: NEAREST shrink to
`max_side`, NEAREST growth of a side below 28, NEAREST aspect clamp), resize BICUBIC to the
processor's size the way PIL does (separable, antialiased), rescale by 1/255, normalize, and
lay the pixels out as the processor's patch rows. The nearest-neighbour chain and the bicubic
taps compose into per-axis tables (`resample_tables`): for every output row (column), K source
rows (columns) of the original image and their weights. The kernel then reads only the taps.

Like PIL, it rounds to an 8-bit level and clips to 0..255 after each of its two passes, in
the pass order of the installed Pillow (`pil_vertical_first`), but it weighs in float32 where
PIL uses fixed-point weights: pixels stay within 2 levels of the stock processor's (0.5 on
average), the bound tests/test_crop_patch_embed.py checks on full-range images.

Two ops: `torch.ops.vpt_fast.crop_patch_rows(image, iy, wy, ix, wx, mean, std, patch_size,
merge_size, vertical_first) -> rows (N, 3*p*p) float32` (one temporal frame, processor order)
is the kernel contract, with backends torch (`crop_patch_rows_torch`, the definition), triton
(`vpt_fast.kernels.crop_patch_embed`) and ext (the extension's C++/CUDA kernels);
`torch.ops.vpt_fast.crop_patch_embed(image, box, out_hw, ...)` builds the tables on the host
and runs it (an opaque op: the tables depend on the box's values).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Optional

import torch

from ..preprocess import CLAMPED_ASPECT, CLIP_MEAN, CLIP_STD, MAX_ASPECT, MIN_SIDE
from . import _registry

# ----------------------------------------------------------------------------- resampling tables


def _cap_steps(width: int, height: int, max_side: int) -> list[tuple[int, int]]:
    """(width, height) after each NEAREST resize of `preprocess.cap_image`, starting with the input."""
    sizes = [(width, height)]
    longer = max(width, height)
    if longer > max_side:
        ratio = max_side / longer
        sizes.append((max(1, int(width * ratio)), max(1, int(height * ratio))))
    width, height = sizes[-1]
    if min(width, height) < MIN_SIDE:
        width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)
        sizes.append((width, height))
    if width / height > MAX_ASPECT:
        sizes.append((height * CLAMPED_ASPECT, height))
    elif height / width > MAX_ASPECT:
        sizes.append((width, width * CLAMPED_ASPECT))
    return sizes


def _nearest_source(in_size: int, out_size: int) -> torch.Tensor:
    """PIL's NEAREST resize along one axis: the input index of each output index (int64).

    PIL steps a running float64 position, xo = a/2 then xo += a per pixel with a = in/out, and
    truncates it. At positions that are exact integers the running sum can fall just short,
    where int((x + 0.5) * in / out) does not; the CPU's cumulative sum is sequential in float64,
    which reproduces PIL's steps exactly.
    """
    step = in_size / out_size
    positions = torch.full((out_size,), step, dtype=torch.float64)
    positions[0] = step * 0.5
    return torch.cumsum(positions, 0).floor_().long()


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter, a = -0.5, in its evaluation order."""
    a = -0.5
    t = t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def _bicubic_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's `precompute_coeffs` for BICUBIC: per output index, K input indices and weights
    (float64), K the largest tap count; unused taps get weight 0 and a valid index."""
    if in_size == out_size:  # PIL skips the pass; the taps would be (0, 1, 0, 0)
        return torch.arange(out_size)[:, None], torch.ones(out_size, 1, dtype=torch.float64)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    # C's (int) truncates toward zero
    first = (center - support + 0.5).trunc().clamp_(min=0)
    count = (center + support + 0.5).trunc().clamp_(max=in_size) - first
    taps = int(count.max())
    offset = torch.arange(taps, dtype=torch.float64)
    index = first[:, None] + offset  # float64 holds these integers exactly
    weight = _bicubic((index - center[:, None] + 0.5) * (1.0 / filterscale))
    weight = torch.where(offset < count[:, None], weight, torch.zeros_like(weight))
    total = weight.sum(dim=1, keepdim=True)
    weight = torch.where(total != 0, weight / total, weight)
    return index.clamp_(max=in_size - 1).long(), weight


def resample_tables(height: int, width: int, box: Sequence[int], out_hw: Sequence[int], max_side: int = 512,
                    *, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """Sampling tables of one crop: (iy (H', Ky) int32, wy (H', Ky) float32, ix (W', Kx) int32,
    wx (W', Kx) float32).

    For output pixel (y, x) of the (H', W') = `out_hw` picture, the bicubic resize of the crop
    `box` = (x0, y0, x1, y1) of a `height` x `width` image capped at `max_side`, the value is
    sum_i sum_j wy[y, i] * wx[x, j] * image[iy[y, i], ix[x, j]]: indices are rows/columns of
    the original image. The tables are built on the CPU (the nearest-neighbour chain needs
    PIL's sequential float64 steps, see `_nearest_source`) and moved to `device` once.
    """
    x0, y0, x1, y1 = _check_box(box, height, width)
    out_h, out_w = (_positive_int("out_hw", v) for v in out_hw)
    sizes = _cap_steps(x1 - x0, y1 - y0, _positive_int("max_side", max_side))
    tables = []
    for axis, start, out_size in ((1, y0, out_h), (0, x0, out_w)):
        capped = sizes[-1][axis]
        index, weight = _bicubic_taps(capped, out_size)
        # walk each capped index back through the NEAREST resizes to the crop
        for before, after in zip(reversed(sizes[:-1]), reversed(sizes[1:])):
            if before[axis] != after[axis]:
                index = _nearest_source(before[axis], after[axis])[index]
        tables += [(index + start).to(torch.int32), weight.to(torch.float32)]
    if device is None or torch.device(device).type == "cpu":
        return tuple(tables)
    # one host-to-device copy instead of four: the float32 weights travel as their int32 bits
    packed = torch.cat([t.view(torch.int32).flatten() for t in tables]).to(device)
    parts = packed.split([t.numel() for t in tables])
    return tuple(part.view(t.dtype).view(t.shape) for part, t in zip(parts, tables))


# ----------------------------------------------------------------------------- the kernel contract


def pil_round(v: torch.Tensor) -> torch.Tensor:
    """Round half up and clip to [0, 255], as PIL ends each 8-bit resampling pass."""
    return torch.floor(v + 0.5).clamp_(0, 255)


def pil_vertical_first(in_hw: Sequence[int], out_hw: Sequence[int]) -> bool:
    """Whether the installed Pillow runs its vertical pass first for this resize.

    Pillow 13 runs it first when the height shrinks by more than twice the width's shrink;
    earlier releases always start with the horizontal pass. The order changes where the
    first pass's 8-bit rounding happens, so the op follows the Pillow the stock path uses.
    """
    import PIL

    if int(PIL.__version__.split(".")[0]) < 13:
        return False
    dh, dw = in_hw[0] - out_hw[0], in_hw[1] - out_hw[1]
    return dh > 0 and dh > 2 * dw


def crop_patch_rows_torch(image, iy, wy, ix, wx, mean, std, patch_size: int = 14, merge_size: int = 2,
                          vertical_first: bool = False) -> torch.Tensor:
    """The definition: single-frame patch rows (N, 3*p*p) float32 in the processor's order.

    Row n is patch (h/m, w/m, m, m)-ordered; its value at (c, py, px), output pixel (y, x), is
    (R(sum_i wy[y, i] R(sum_j wx[x, j] image[iy[y, i], ix[x, j], c])) / 255 - mean[c]) / std[c],
    R rounding half up and clipping to [0, 255]: PIL's 8-bit resampling ends each of its two
    passes that way, and bicubic overshoot makes the clipping matter. With vertical_first the
    sums nest the other way (along y first, rounded, then along x), as Pillow orders them for
    some sizes (`pil_vertical_first`).
    """
    out_h, ky = iy.shape
    out_w, kx = ix.shape
    taps = image.index_select(0, iy.reshape(-1)).index_select(1, ix.reshape(-1))
    taps = taps.view(out_h, ky, out_w, kx, 3).float()
    if vertical_first:
        cols_y = pil_round(torch.einsum("yixjc,yi->yxjc", taps, wy))
        pixels = pil_round(torch.einsum("xj,yxjc->cyx", wx, cols_y))
    else:
        rows_x = pil_round(torch.einsum("yixjc,xj->yixc", taps, wx))
        pixels = pil_round(torch.einsum("yi,yixc->cyx", wy, rows_x))
    pixels = (pixels * (1 / 255) - mean[:, None, None]) / std[:, None, None]
    p, m = patch_size, merge_size
    grid_h, grid_w = out_h // p, out_w // p
    rows = pixels.reshape(3, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    return rows.reshape(grid_h * grid_w, 3 * p * p)


def crop_patch_rows_triton(image, iy, wy, ix, wx, mean, std, patch_size: int = 14, merge_size: int = 2,
                           vertical_first: bool = False) -> torch.Tensor:
    from ..kernels.crop_patch_embed import crop_patch_rows_triton as launch

    return launch(image, iy, wy, ix, wx, mean, std, patch_size, merge_size, vertical_first)


def crop_patch_rows_ext(image, iy, wy, ix, wx, mean, std, patch_size: int = 14, merge_size: int = 2,
                        vertical_first: bool = False) -> torch.Tensor:
    return torch.ops.vpt_fast_ext.crop_patch_rows(image, iy, wy, ix, wx, mean, std, patch_size, merge_size, vertical_first)


IMPLEMENTATIONS = {"torch": crop_patch_rows_torch, "triton": crop_patch_rows_triton, "ext": crop_patch_rows_ext}
_registry.register("crop_patch_rows", {"triton": _registry.triton_status("crop_patch_embed"),
                                       "ext": _registry.extension_status("crop_patch_rows")})


def _rows_fake(image, iy, wy, ix, wx, mean, std, patch_size, merge_size, vertical_first):
    rows = (iy.shape[0] // patch_size) * (ix.shape[0] // patch_size)
    return image.new_empty((rows, 3 * patch_size * patch_size), dtype=torch.float32)


@_registry.define("crop_patch_rows", fake=_rows_fake)
def _crop_patch_rows_op(image: torch.Tensor, iy: torch.Tensor, wy: torch.Tensor, ix: torch.Tensor, wx: torch.Tensor,
                        mean: torch.Tensor, std: torch.Tensor, patch_size: int, merge_size: int,
                        vertical_first: bool) -> torch.Tensor:
    return IMPLEMENTATIONS[_registry.backend("crop_patch_rows", image.device.type)](
        image, iy, wy, ix, wx, mean, std, patch_size, merge_size, vertical_first)


def crop_patch_rows(image, iy, wy, ix, wx, mean, std, patch_size: int = 14, merge_size: int = 2,
                    vertical_first: bool = False) -> torch.Tensor:
    """Single-frame patch rows of `image` through resampling tables (see `crop_patch_rows_torch`)."""
    return torch.ops.vpt_fast.crop_patch_rows(image, iy, wy, ix, wx, mean, std, patch_size, merge_size, vertical_first)


# ----------------------------------------------------------------------------- checks and entry point


def _check_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (operator.index(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"crop_patch_embed: box must be four integers (x0, y0, x1, y1), got {box!r}") from exc
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"crop_patch_embed: box {(x0, y0, x1, y1)} is empty or outside the {width}x{height} image "
                         f"(need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height})")
    return x0, y0, x1, y1


def _positive_int(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError as exc:
        raise TypeError(f"crop_patch_embed: {name} must be an integer, got {value!r}") from exc
    if value <= 0:
        raise ValueError(f"crop_patch_embed: {name} must be positive, got {value}")
    return value


def _channel_values(name: str, values) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"crop_patch_embed: {name} must be 3 numbers (one per RGB channel), got {values!r}") from exc
    if len(values) != 3:
        raise ValueError(f"crop_patch_embed: {name} must hold 3 values (one per RGB channel), got {len(values)}")
    return values


@functools.lru_cache(maxsize=32)
def _device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A float32 tensor of `values` on `device`, made once (mean and std are the same every call)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _check(image, out_hw, weight, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[int, int]:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"crop_patch_embed: image must be a uint8 tensor (H, W, 3), got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"crop_patch_embed: image must be a uint8 tensor (H, W, 3), got dtype {image.dtype}")
    if image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"crop_patch_embed: image must be (H, W, 3) RGB, got shape {tuple(image.shape)}")
    if not image.is_contiguous():
        raise ValueError(f"crop_patch_embed: image must be contiguous (H, W, 3), got strides {image.stride()}")
    factor = patch_size * merge_size
    if len(out_hw) != 2:
        raise ValueError(f"crop_patch_embed: out_hw must be (height, width), got {tuple(out_hw)!r}")
    out_h, out_w = (_positive_int("out_hw", v) for v in out_hw)
    if out_h % factor or out_w % factor:
        raise ValueError(f"crop_patch_embed: out_hw must be positive multiples of {factor} "
                         f"(patch_size * merge_size), got {(out_h, out_w)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"crop_patch_embed: weight must be a tensor, got {type(weight).__name__}")
        expected = (3, temporal_patch_size, patch_size, patch_size)
        if weight.dim() != 5 or tuple(weight.shape[1:]) != expected:
            raise ValueError(f"crop_patch_embed: weight must be the Conv3d patch embedding (E, {', '.join(map(str, expected))}), "
                             f"got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"crop_patch_embed: weight must be floating point, got {weight.dtype}")
        if weight.device != image.device:
            raise ValueError(f"crop_patch_embed: weight is on {weight.device}, the image on {image.device}")
    return out_h, out_w


@torch.library.custom_op("vpt_fast::crop_patch_embed", mutates_args=())
def _crop_patch_embed_op(image: torch.Tensor, box: list[int], out_hw: list[int], mean: list[float], std: list[float],
                         max_side: int, patch_size: int, merge_size: int, temporal_patch_size: int,
                         weight: Optional[torch.Tensor]) -> torch.Tensor:
    height, width = image.shape[:2]
    iy, wy, ix, wx = resample_tables(height, width, box, out_hw, max_side, device=image.device)
    capped = _cap_steps(box[2] - box[0], box[3] - box[1], max_side)[-1]  # (width, height) before the bicubic step
    vertical_first = pil_vertical_first((capped[1], capped[0]), out_hw)
    mean_t, std_t = _device_constant(tuple(mean), image.device), _device_constant(tuple(std), image.device)
    rows = _crop_patch_rows_op(image, iy, wy, ix, wx, mean_t, std_t, patch_size, merge_size, vertical_first)
    if weight is None:
        n = rows.shape[0]
        return rows.view(n, 3, 1, patch_size * patch_size).expand(n, 3, temporal_patch_size, patch_size * patch_size).reshape(n, -1)
    return rows.to(weight.dtype) @ weight.sum(dim=2).reshape(weight.shape[0], -1).T


@_crop_patch_embed_op.register_fake
def _(image, box, out_hw, mean, std, max_side, patch_size, merge_size, temporal_patch_size, weight):
    n = (out_hw[0] // patch_size) * (out_hw[1] // patch_size)
    if weight is None:
        return image.new_empty((n, 3 * temporal_patch_size * patch_size * patch_size), dtype=torch.float32)
    return weight.new_empty((n, weight.shape[0]))


def crop_patch_embed(image: torch.Tensor, box: Sequence[int], out_hw: Sequence[int], *, weight: torch.Tensor | None = None,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, max_side: int = 512,
                     patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2) -> torch.Tensor:
    """Qwen2-VL patch rows, or patch embeddings, of the crop `box` of `image`.

    image: uint8 (H, W, 3), contiguous, on any device; box: (x0, y0, x1, y1) pixel edges inside
    it (the whole image for a first image); out_hw: the processor's size (H', W') for the capped
    crop (`preprocess.smart_resize` of `cap_image`'s size), multiples of patch_size * merge_size.

    Returns rows (N, 3*T*p*p) float32, exactly the processor's `pixel_values` layout (each
    frame repeated T = temporal_patch_size times), N = H'W'/p^2; or, with `weight` (the
    bias-free Conv3d patch embedding (E, 3, T, p, p)), the embeddings (N, E) in weight.dtype,
    computed as one matmul with the temporal slices of the weight summed (the frames are equal).
    """
    patch_size = _positive_int("patch_size", patch_size)
    merge_size = _positive_int("merge_size", merge_size)
    temporal_patch_size = _positive_int("temporal_patch_size", temporal_patch_size)
    max_side = _positive_int("max_side", max_side)
    out_hw = _check(image, tuple(out_hw), weight, patch_size, merge_size, temporal_patch_size)
    height, width = image.shape[:2]
    box = list(_check_box(box, height, width))
    return torch.ops.vpt_fast.crop_patch_embed(image, box, list(out_hw), list(_channel_values("mean", mean)),
                                               list(_channel_values("std", std)), max_side, patch_size, merge_size,
                                               temporal_patch_size, weight)
