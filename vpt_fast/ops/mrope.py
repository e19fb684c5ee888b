"""mrope_positions: Qwen2-VL 3-D rotary positions of a segment appended to a sequence.

docs/vpt.md §6: text tokens get (p, p, p) increasing by one; a run of `<|image_pad|>`
tokens is an image and gets (s + t, s + h, s + w) over its merged grid, s the next
text position, and text after it resumes at s + max(grid_h, grid_w) / merge.
Re-encoding pads are text. Only the segment is computed, from where the sequence
stands, not the whole sequence.
"""

from __future__ import annotations

from typing import Sequence

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x * cos + rotate_half(x) * sin, with transformers' operation order
    (cos/sin already broadcastable to x: the M-RoPE-composed tables of Qwen2-VL)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def mrope_positions(token_ids, start: int, image_grids: Sequence[Sequence[int]] = (), *, image_pad_id: int,
                    spatial_merge_size: int = 2) -> tuple[torch.Tensor, int]:
    """Positions (3, T) int64 of `token_ids` placed after a sequence whose next text
    position is `start`, and the next text position after the segment.

    image_grids: (t, h, w) patch grids of the images in the segment, in order.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
    grids = [tuple(int(x) for x in g) for g in image_grids]
    is_image = (ids == image_pad_id).to(torch.int8)
    # runs of equal "is image" flags
    change = torch.nonzero(torch.diff(is_image, prepend=is_image[:1] ^ 1)).flatten().tolist() + [len(ids)]
    parts, p, used = [], int(start), 0
    for a, b in zip(change[:-1], change[1:]):
        n = b - a
        if not is_image[a]:
            parts.append(torch.arange(p, p + n).expand(3, n))
            p += n
            continue
        if used >= len(grids):
            raise ValueError(f"mrope_positions: image run at {a} but only {len(grids)} image grids were given")
        t, h, w = grids[used]
        used += 1
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        if t * gh * gw != n:
            raise ValueError(f"mrope_positions: image run of {n} tokens at {a} does not match grid {(t, h, w)} ({t * gh * gw} tokens)")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        parts.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + p)
        p += max(gh, gw)
    if used != len(grids):
        raise ValueError(f"mrope_positions: {len(grids)} image grids given, {used} image runs in the segment")
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions, p
