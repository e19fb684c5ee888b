"""Triton kernel of crop_patch_rows: resample, rescale, normalize and patchify in one pass.

One program per 14x14 patch, written as a masked 16x16 tile per channel. Every output pixel is
a weighted sum over KY x KX taps of the uint8 image (the resampling tables of
`vpt_fast.ops.crop_patch_embed.resample_tables`): along x for each tap row, rounded to an 8-bit
level as PIL rounds its first pass, then along y, rounded again (or y first, for the sizes where
Pillow starts with its vertical pass), scaled by 1/255 and normalized. Rows come out in the Qwen2-VL processor's order
(h/m, w/m, m, m), each row (C, p, p) for one temporal frame.

The tap counts are compile-time constants: a resize by a factor s has about 4s + 1 taps per
axis (1 where the size is unchanged), so a handful of variants cover the sizes met in practice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._registry import launcher


@triton.jit
def _crop_patch_rows_kernel(
    image_ptr, iy_ptr, wy_ptr, ix_ptr, wx_ptr, mean_ptr, std_ptr, out_ptr,
    image_w, merged_w,
    KY: tl.constexpr, KX: tl.constexpr, P: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr,
    VERTICAL_FIRST: tl.constexpr,
):
    n = tl.program_id(0)
    # row n is patch (mw, mh) of merge group (bw, bh): n = ((bh * merged_w + bw) * M + mh) * M + mw
    mw = n % M
    mh = (n // M) % M
    group = n // (M * M)
    bw = group % merged_w
    bh = group // merged_w
    y0 = (bh * M + mh) * P
    x0 = (bw * M + mw) * P

    py = tl.arange(0, BLOCK)
    px = tl.arange(0, BLOCK)
    in_y = py < P
    in_x = px < P
    inside = in_y[:, None] & in_x[None, :]
    out_y = y0 + py
    out_x = x0 + px

    # tl.full, a builtin, rather than tl.zeros, a jit function of triton's standard library:
    # that one only runs in the interpreter if triton itself was imported under TRITON_INTERPRET=1
    acc_r = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
    acc_g = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
    acc_b = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
    if VERTICAL_FIRST:  # Pillow's order for some sizes: sums along y first, rounded, then along x
        for j in range(KX):
            src_x = tl.load(ix_ptr + out_x * KX + j, mask=in_x, other=0).to(tl.int64)
            w_x = tl.load(wx_ptr + out_x * KX + j, mask=in_x, other=0.0)
            col_r = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
            col_g = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
            col_b = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
            for i in range(KY):
                src_y = tl.load(iy_ptr + out_y * KY + i, mask=in_y, other=0).to(tl.int64)
                w_y = tl.load(wy_ptr + out_y * KY + i, mask=in_y, other=0.0)
                pixel = (src_y[:, None] * image_w + src_x[None, :]) * 3
                col_r += w_y[:, None] * tl.load(image_ptr + pixel, mask=inside, other=0).to(tl.float32)
                col_g += w_y[:, None] * tl.load(image_ptr + pixel + 1, mask=inside, other=0).to(tl.float32)
                col_b += w_y[:, None] * tl.load(image_ptr + pixel + 2, mask=inside, other=0).to(tl.float32)
            acc_r += w_x[None, :] * tl.minimum(tl.maximum(tl.floor(col_r + 0.5), 0.0), 255.0)
            acc_g += w_x[None, :] * tl.minimum(tl.maximum(tl.floor(col_g + 0.5), 0.0), 255.0)
            acc_b += w_x[None, :] * tl.minimum(tl.maximum(tl.floor(col_b + 0.5), 0.0), 255.0)
    else:
        for i in range(KY):
            src_y = tl.load(iy_ptr + out_y * KY + i, mask=in_y, other=0).to(tl.int64)
            w_y = tl.load(wy_ptr + out_y * KY + i, mask=in_y, other=0.0)
            row = src_y * image_w
            row_r = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
            row_g = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
            row_b = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
            for j in range(KX):
                src_x = tl.load(ix_ptr + out_x * KX + j, mask=in_x, other=0).to(tl.int64)
                w_x = tl.load(wx_ptr + out_x * KX + j, mask=in_x, other=0.0)
                pixel = (row[:, None] + src_x[None, :]) * 3
                row_r += w_x[None, :] * tl.load(image_ptr + pixel, mask=inside, other=0).to(tl.float32)
                row_g += w_x[None, :] * tl.load(image_ptr + pixel + 1, mask=inside, other=0).to(tl.float32)
                row_b += w_x[None, :] * tl.load(image_ptr + pixel + 2, mask=inside, other=0).to(tl.float32)
            # PIL rounds each pass to an 8-bit level (half up, clipped)
            acc_r += w_y[:, None] * tl.minimum(tl.maximum(tl.floor(row_r + 0.5), 0.0), 255.0)
            acc_g += w_y[:, None] * tl.minimum(tl.maximum(tl.floor(row_g + 0.5), 0.0), 255.0)
            acc_b += w_y[:, None] * tl.minimum(tl.maximum(tl.floor(row_b + 0.5), 0.0), 255.0)

    acc_r = tl.minimum(tl.maximum(tl.floor(acc_r + 0.5), 0.0), 255.0)
    acc_g = tl.minimum(tl.maximum(tl.floor(acc_g + 0.5), 0.0), 255.0)
    acc_b = tl.minimum(tl.maximum(tl.floor(acc_b + 0.5), 0.0), 255.0)
    out = out_ptr + n.to(tl.int64) * (3 * P * P) + py[:, None] * P + px[None, :]
    scale = 1.0 / 255.0
    tl.store(out, (acc_r * scale - tl.load(mean_ptr)) / tl.load(std_ptr), mask=inside)
    tl.store(out + P * P, (acc_g * scale - tl.load(mean_ptr + 1)) / tl.load(std_ptr + 1), mask=inside)
    tl.store(out + 2 * P * P, (acc_b * scale - tl.load(mean_ptr + 2)) / tl.load(std_ptr + 2), mask=inside)


def crop_patch_rows_triton(image, iy, wy, ix, wx, mean, std, patch_size: int, merge_size: int,
                           vertical_first: bool = False) -> torch.Tensor:
    """Single-frame patch rows (N, 3*p*p) float32; arguments as `crop_patch_rows_torch`,
    already checked (contiguous tables and image, one device)."""
    out_h, out_w = iy.shape[0], ix.shape[0]
    rows = torch.empty((out_h // patch_size) * (out_w // patch_size), 3 * patch_size * patch_size,
                       dtype=torch.float32, device=image.device)
    if rows.shape[0]:
        launcher(_crop_patch_rows_kernel)[(rows.shape[0],)](
            image, iy, wy, ix, wx, mean, std, rows,
            image.shape[1], out_w // (patch_size * merge_size),
            KY=iy.shape[1], KX=ix.shape[1], P=patch_size, M=merge_size, BLOCK=triton.next_power_of_2(patch_size),
            VERTICAL_FIRST=vertical_first,
        )
    return rows
