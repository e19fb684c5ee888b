"""Inputs, independent references and backend pinning shared by the op tests (one file per op)."""

from __future__ import annotations

import pytest
import torch

from vpt_fast.ops import _registry

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLOCK = 16  # paged layout block size
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}


# ----------------------------------------------------------------------------- crop_patch_rows


def gather_einsum_rows(image, iy, wy, ix, wx, mean, std, patch_size: int, merge_size: int,
                       vertical_first: bool = False) -> torch.Tensor:
    """crop_patch_rows written independently of the op. Gather; weighted sum along x for each
    tap row, rounded half up and clipped to 0..255; then along y, rounded again (PIL's two 8-bit
    passes; with vertical_first, y first, then x); normalize; cut into patch rows in the
    Qwen2-VL processor's order (merge block row, merge block column, i, j), values (c, py, px)."""
    img = image.float()
    taps = img[iy.long()][:, :, ix.long()]  # (H', Ky, W', Kx, 3)
    if vertical_first:
        cols = torch.floor(torch.einsum("yaxbc,ya->yxbc", taps, wy) + 0.5).clamp(0, 255)
        out = torch.floor(torch.einsum("yxbc,xb->yxc", cols, wx) + 0.5).clamp(0, 255)
    else:
        rows = torch.floor(torch.einsum("yaxbc,xb->yaxc", taps, wx) + 0.5).clamp(0, 255)
        out = torch.floor(torch.einsum("yaxc,ya->yxc", rows, wy) + 0.5).clamp(0, 255)
    out = (out * (1 / 255) - mean) / std
    p, m = patch_size, merge_size
    gh, gw = out.shape[0] // p, out.shape[1] // p
    x = out.permute(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p)  # c, hb, i, py, wb, j, px
    return x.permute(1, 4, 2, 5, 0, 3, 6).reshape(gh * gw, 3 * p * p)


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", std=CLIP_STD) -> None:
    """crop_patch_rows outputs agree: within 1e-5, except that a sum landing on a rounding
    boundary may come out one 8-bit level apart when two backends add in different orders
    (at most 0.5% of values, each by at most one level, 1/255/std)."""
    assert actual.shape == expected.shape and actual.dtype == torch.float32, what
    err = (actual.cpu() - expected.cpu()).abs()
    p2 = actual.shape[1] // 3
    level = (1 / 255) / torch.tensor(std).repeat_interleave(p2)[None, :]
    off = err > 1e-5
    worst = float((err - level).max())
    if worst > 1e-5 or float(off.float().mean()) > 0.005:
        bad = off.nonzero()[:8].tolist()
        raise AssertionError(f"{what}: {int(off.sum())} of {err.numel()} values off by more than 1e-5 "
                             f"(max {float(err.max()):.3g}, one level is {float(level.min()):.3g}), first {bad}")


def crop_inputs(img_hw, out_hw, taps, gen: torch.Generator, device="cpu", normalized: bool = True):
    """A random uint8 image and random sampling tables: `taps` = (Ky, Kx) source indices per
    output row/column, anywhere in the image, with positive weights (summing to 1 when
    `normalized`) or signed ones (as bicubic kernels have)."""
    (img_h, img_w), (out_h, out_w), (ky, kx) = img_hw, out_hw, taps
    image = torch.randint(0, 256, (img_h, img_w, 3), generator=gen, dtype=torch.uint8)
    iy = torch.randint(0, img_h, (out_h, ky), generator=gen, dtype=torch.int32)
    ix = torch.randint(0, img_w, (out_w, kx), generator=gen, dtype=torch.int32)
    if normalized:
        wy = torch.rand(out_h, ky, generator=gen) + 0.05
        wx = torch.rand(out_w, kx, generator=gen) + 0.05
        wy, wx = wy / wy.sum(1, keepdim=True), wx / wx.sum(1, keepdim=True)
    else:
        wy = torch.randn(out_h, ky, generator=gen) * 0.6
        wx = torch.randn(out_w, kx, generator=gen) * 0.6
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return [t.to(device) for t in (image, iy, wy, ix, wx, mean, std)]


# ----------------------------------------------------------------------------- kv_splice


def splice_inputs(layout: str, tokens: int, heads: int, dim: int, gen: torch.Generator, *, in_dtype=torch.float32,
                  cache_dtype=torch.float32, rotate: bool = False, pad: int = 3, skip: float = 0.25, device="cpu"):
    """Arguments of kv_splice: new keys/values padded with `pad` extra rows, NaN-poisoned caches
    of the engine's layout (sequences x max_len) or a paged one (blocks of BLOCK), int64 slots
    with about `skip` of them -1, and cos/sin tables (padded too) when `rotate`."""
    if layout == "engine":
        sequences, max_len = 3, tokens + 5
        shape = (sequences, max_len, heads, dim)
        # runs of consecutive positions, one run per sequence, as the engine appends
        counts = [tokens // sequences + (i < tokens % sequences) for i in range(sequences)]
        parts = [s * max_len + int(torch.randint(0, max_len - c + 1, (1,), generator=gen)) + torch.arange(c)
                 for s, c in zip(torch.randperm(sequences, generator=gen).tolist(), counts)]
        slots = torch.cat(parts)
    else:
        shape = (-(-tokens // BLOCK) + 2, BLOCK, heads, dim)
        slots = torch.randperm(shape[0] * BLOCK, generator=gen)[:tokens]
    slots = torch.where(torch.rand(tokens, generator=gen) < skip, -1, slots).to(torch.int64)
    n = tokens + pad
    k_new = torch.randn(n, heads, dim, generator=gen).to(in_dtype)
    v_new = torch.randn(n, heads, dim, generator=gen).to(in_dtype)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype)
    cos = sin = None
    if rotate:
        angle = torch.rand(n, dim // 2, generator=gen) * 40
        angle = torch.cat([angle, angle], dim=-1)
        cos, sin = angle.cos().to(in_dtype), angle.sin().to(in_dtype)
    moved = [None if t is None else t.to(device) for t in (k_new, v_new, k_cache, v_cache, slots, cos, sin)]
    return moved


def _rotated(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One token's keys (heads, dim) rotated, written out half by half: (x1, x2) ->
    (x1 cos - x2 sin, x2 cos + x1 sin), in the promoted dtype of the keys and the tables."""
    dtype = torch.promote_types(k.dtype, cos.dtype)
    k, cos, sin = k.to(dtype), cos.to(dtype), sin.to(dtype)
    h = k.shape[-1] // 2
    x1, x2 = k[:, :h], k[:, h:]
    return torch.cat([x1 * cos[:h] - x2 * sin[:h], x2 * cos[h:] + x1 * sin[h:]], dim=-1)


def reference_caches(k_new, v_new, k_cache, v_cache, slots, cos=None, sin=None):
    """The caches kv_splice must leave, from copies of the given ones, written one token at a
    time here (independently of the op and its definition): slot s of a [blocks, block_size,
    ...] cache is block s // block_size, offset s % block_size; -1 writes nothing."""
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for n, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        k = k_new[n] if cos is None else _rotated(k_new[n], cos[n], sin[n])
        k_exp[slot // block_size, slot % block_size] = k.to(k_cache.dtype)
        v_exp[slot // block_size, slot % block_size] = v_new[n].to(v_cache.dtype)
    return k_exp, v_exp


def splice_with_reference(splice, k_new, v_new, k_cache, v_cache, slots, cos=None, sin=None):
    """Run `splice` (a kv_splice implementation) on the caches; return what `reference_caches`
    makes of the same caches."""
    k_exp, v_exp = reference_caches(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    return k_exp, v_exp


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equality compared in float32 (any dtypes), NaN (untouched poison) equal to NaN."""
    a, e = actual.float(), expected.float()
    same = (a == e) | (a.isnan() & e.isnan())
    if not bool(same.all()):
        bad = (~same).nonzero()[:8].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} entries differ, first at {bad}: "
                             f"{[a[tuple(i)].item() for i in bad]} vs {[e[tuple(i)].item() for i in bad]}")


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality, NaN (untouched poison) where NaN, listing the first mismatches."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    view = INT_VIEW[actual.dtype]
    same = (actual.view(view) == expected.view(view)) | (actual.isnan() & expected.isnan())
    if not bool(same.all()):
        bad = (~same).nonzero()[:8].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} entries differ, first at {bad}: "
                             f"{[actual[tuple(i)].item() for i in bad]} vs {[expected[tuple(i)].item() for i in bad]}")


# ----------------------------------------------------------------------------- backends


def can_run(op: str, backend: str, device_type: str = "cpu") -> bool | str:
    """True when `backend` of `op` can run on `device_type` here, else why not."""
    return _registry._OPS[op][backend](device_type)


def runnable(op: str, backend: str, device_type: str = "cpu"):
    """Skip the test unless `backend` of `op` can run on `device_type` here."""
    status = can_run(op, backend, device_type)
    if status is not True:
        pytest.skip(f"{op}: the {backend} backend cannot run on {device_type}: {status}")


def use_backend(monkeypatch, op: str, backend: str, device_type: str = "cpu") -> None:
    """Pin `op` to `backend` for this test (the process-wide choice is restored afterwards); skip
    when that backend cannot run here."""
    runnable(op, backend, device_type)
    monkeypatch.setitem(_registry._chosen, (op, device_type), backend)


def spy_backends(monkeypatch, implementations: dict, label: str = "") -> list:
    """Wrap every implementation of an op (its IMPLEMENTATIONS dict) so that each call records
    (label, backend name) in the returned list: a test can then tell which backend ran."""
    ran = []
    for name, fn in list(implementations.items()):
        def spy(*args, _fn=fn, _name=name, **kwargs):
            ran.append((label, _name))
            return _fn(*args, **kwargs)

        monkeypatch.setitem(implementations, name, spy)
    return ran
