"""Kernel benchmarks, each op against its baseline in the same run.

- crop_patch_embed (image already on the device, crop -> patch embeddings in one pass)
  against the stock path: PIL crop + cap + Qwen2-VL processor on the CPU, host-to-device
  copy, Conv3d patch embedding;
- kv_splice against torch indexing (the reference), per backend, with achieved GB/s
  and the share of the measured copy bandwidth;
- decode_attention and prefill_attention (paged, scattered blocks) per backend against their torch definitions.

    python benchmarks/kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, environment, table, timed, write_results  # noqa: E402

from vpt_fast import ops, spec  # noqa: E402
from vpt_fast.ops import BackendUnavailable  # noqa: E402
from vpt_fast.preprocess import VPTImageProcessor, smart_resize  # noqa: E402


def _backends(device):
    return ["cuda", "triton", "torch"] if device.type == "cuda" else ["cpp", "torch"]


def bench_crop(device, reps, rows):
    proc = VPTImageProcessor()
    embed_dim = 1280
    conv = torch.nn.Conv3d(3, embed_dim, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False).to(device)
    weight = conv.weight.detach()
    rs = np.random.RandomState(0)
    original = Image.fromarray(rs.randint(0, 256, (1080, 1920, 3), dtype=np.uint8))
    on_device = torch.from_numpy(np.array(original)).to(device).contiguous()
    for cells in [(2, 3, 5, 5), (0, 0, 7, 7), (3, 3, 3, 3)]:
        box = spec.region_box(cells, *original.size)
        crop = proc.prepare_crop(original, box)
        out_hw = smart_resize(crop.height, crop.width, 28, proc.qwen.min_pixels, proc.qwen.max_pixels)

        def stock():
            pixels, _ = proc.qwen_inputs([proc.prepare_crop(original, box)])
            with torch.no_grad():
                conv(pixels.to(device).view(-1, 3, 2, 14, 14))

        base = statistics.median(timed(stock, device, reps))
        for backend in _backends(device):
            try:
                t = statistics.median(timed(lambda: ops.crop_patch_embed(on_device, box, out_hw, weight=weight, backend=backend),
                                            device, reps))
            except BackendUnavailable as e:
                rows.append(dict(op="crop_patch_embed", case=f"box {box}", backend=backend, note=str(e)))
                continue
            rows.append(dict(op="crop_patch_embed", case=f"box {box} -> {out_hw[0]}x{out_hw[1]}", backend=backend,
                             ms=t * 1e3, baseline_ms=base * 1e3, speedup=base / t))


def bench_kv_splice(device, reps, rows, bw, quick):
    heads, dim = 2, 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [1 << 20, 1 << 23] if quick else [1 << 20, 1 << 22, 1 << 24]
    if device.type != "cuda":
        sizes = [1 << 18, 1 << 20]
    for elements in sizes:
        tokens = elements // (heads * dim)
        blocks, block = tokens // 16 * 2, 16
        k = torch.randn(tokens, heads, dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        kc = torch.zeros(blocks, block, heads, dim, device=device, dtype=dtype)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(blocks * block, device=device)[:tokens]
        moved = 2 * 2 * k.numel() * k.element_size() + slots.numel() * 8  # read k, v; write them; read slots
        base = statistics.median(timed(lambda: ops.kv_splice_reference(k, v, kc, vc, slots), device, reps))
        for backend in _backends(device):
            try:
                t = statistics.median(timed(lambda: ops.kv_splice(k, v, kc, vc, slots, backend=backend, check=False),
                                            device, reps))
            except BackendUnavailable as e:
                rows.append(dict(op="kv_splice", case=f"{elements:,} elements", backend=backend, note=str(e)))
                continue
            rows.append(dict(op="kv_splice", case=f"{elements:,} elements", backend=backend, ms=t * 1e3,
                             baseline_ms=base * 1e3, speedup=base / t, gb_s=moved / t / 1e9, share_of_copy=moved / t / bw))


def bench_decode_attention(device, reps, rows, quick):
    heads, kv_heads, dim = 12, 2, 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for B, length in ([(1, 512), (32, 1024)] if quick else [(1, 512), (1, 2048), (8, 1024), (32, 1024)]):
        if device.type != "cuda" and B > 1:
            continue
        block_size = 16
        per_seq = -(-length // block_size)
        q = torch.randn(B, heads, dim, device=device, dtype=dtype)
        kc = torch.randn(B * per_seq + 1, block_size, kv_heads, dim, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        # each sequence's blocks scattered over the cache, as a paged cache hands them out
        tables = (torch.randperm(B * per_seq, device=device) + 1).view(B, per_seq)
        lens = torch.full((B,), length, device=device)
        base = statistics.median(timed(lambda: ops.decode_attention_reference(q, kc, vc, tables, lens, dim**-0.5), device, reps))
        for backend in (["cuda", "triton"] if device.type == "cuda" else []):
            try:
                t = statistics.median(timed(lambda: ops.decode_attention(q, kc, vc, tables, lens, dim**-0.5, backend=backend),
                                            device, reps))
            except BackendUnavailable as e:
                rows.append(dict(op="decode_attention", case=f"B={B} len={length}", backend=backend, note=str(e)))
                continue
            moved = 2 * B * length * kv_heads * dim * kc.element_size()
            rows.append(dict(op="decode_attention", case=f"B={B} len={length}", backend=backend, ms=t * 1e3,
                             baseline_ms=base * 1e3, speedup=base / t, gb_s=moved / t / 1e9))


def bench_prefill_attention(device, reps, rows, quick):
    heads, kv_heads, dim, block_size = 12, 2, 128, 16
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = [(1, 1024, 350), (8, 512, 512)] if quick else [(1, 1024, 350), (1, 2048, 2048), (8, 512, 512), (32, 800, 120)]
    for B, length, new in cases:
        if device.type != "cuda" and B > 1:
            continue
        per_seq = -(-length // block_size)
        q = torch.randn(B * new, heads, dim, device=device, dtype=dtype)
        kc = torch.randn(B * per_seq + 1, block_size, kv_heads, dim, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        tables = (torch.randperm(B * per_seq, device=device) + 1).view(B, per_seq)
        lens = torch.full((B,), length, device=device)
        cu = torch.arange(B + 1, device=device) * new
        case = f"B={B} len={length} new={new}"
        base = statistics.median(timed(lambda: ops.prefill_attention_reference(q, kc, vc, tables, lens, cu, dim**-0.5),
                                       device, reps))
        for backend in (["triton"] if device.type == "cuda" else []):
            t = statistics.median(timed(lambda: ops.prefill_attention(q, kc, vc, tables, lens, cu, dim**-0.5, max_new=new,
                                                                      backend=backend), device, reps))
            moved = B * (2 * length * kv_heads + 2 * new * heads) * dim * kc.element_size()
            rows.append(dict(op="prefill_attention", case=case, backend=backend, ms=t * 1e3, baseline_ms=base * 1e3,
                             speedup=base / t, gb_s=moved / t / 1e9))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    reps = 5 if args.quick else 20
    env = environment(device)
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    rows: list[dict] = []
    bench_crop(device, reps, rows)
    bench_kv_splice(device, reps, rows, bw, args.quick)
    bench_decode_attention(device, reps, rows, args.quick)
    bench_prefill_attention(device, reps, rows, args.quick)
    md = f"Copy bandwidth measured: {bw / 1e12:.3f} TB/s (read + write).\n\n" + table(rows, [
        ("op", "op"), ("case", "case"), ("backend", "backend"), ("ms", "ms"), ("baseline_ms", "baseline ms"),
        ("speedup", "x baseline"), ("gb_s", "GB/s"), ("share_of_copy", "share of copy bw"), ("note", "note")])
    js, mdp = write_results("kernels", env, rows, md)
    print(f"{env['card']}\n{md}\nwrote {js}, {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
