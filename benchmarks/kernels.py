"""Kernel benchmarks, each op against its baseline in the same run.

- crop_patch_embed (image already on the device, crop -> patch embeddings in one pass)
  against the stock path: PIL crop + cap + Qwen2-VL processor on the CPU, host-to-device
  copy, Conv3d patch embedding;
- kv_splice against its torch definition (indexing), with achieved GB/s and the share of the
  measured copy bandwidth;
- decode_attention and prefill_attention (paged, scattered blocks) against their torch definitions.

Every backend that can run on the device is timed through the public op (its Python checks
and dispatch included) and, on a GPU, kernel-only: the call captured in a CUDA graph and
replayed, timed with CUDA events.

    python benchmarks/kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, environment, table, timed, write_results  # noqa: E402

from vpt_fast import ops, spec  # noqa: E402
from vpt_fast.ops import _registry  # noqa: E402
from vpt_fast.preprocess import VPTImageProcessor, smart_resize  # noqa: E402

BACKENDS = ("ext", "triton", "flash_attn", "torch")


def backends(op: str, device) -> list[tuple[str, bool | str]]:
    """(backend, True or why it cannot run) for every backend of `op` on this device; Triton's CPU
    interpreter is not timed."""
    out = []
    for name in BACKENDS:
        if name not in _registry.ops()[op]:
            continue
        status = _registry._OPS[op][name](device.type)
        if name == "triton" and device.type != "cuda":
            status = "Triton runs on the CPU only in its interpreter, not timed"
        out.append((name, status))
    return out


@contextmanager
def pinned(op: str, backend: str, device):
    """The op runs `backend` on this device inside the block (the choice is restored after)."""
    key = (op, device.type)
    before = _registry._chosen.get(key)
    _registry._chosen[key] = backend
    try:
        yield
    finally:
        if before is None:
            del _registry._chosen[key]
        else:
            _registry._chosen[key] = before


def kernel_ms(fn, device, reps: int = 20, inner: int = 10) -> float | None:
    """Milliseconds of one call of `fn` without Python dispatch or launch gaps: `inner` calls
    captured in a CUDA graph, replayed `reps` times between CUDA events. None on the CPU, or when
    the call cannot be captured (it reads values on the host)."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except RuntimeError:
        return None
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (reps * inner)


def measure(op: str, device, reps: int, rows: list[dict], case: str, run, base_s: float, moved: int | None = None,
            bw: float | None = None) -> None:
    """Time `run()` (a call of the public op) for every backend of `op`, against base_s."""
    for backend, status in backends(op, device):
        if status is not True:
            rows.append(dict(op=op, case=case, backend=backend, note=str(status)))
            continue
        try:
            with pinned(op, backend, device):
                t = statistics.median(timed(run, device, reps))
                kernel = kernel_ms(run, device)
        except (RuntimeError, ValueError) as e:  # e.g. flash-attn's paged cache wants blocks of 256
            rows.append(dict(op=op, case=case, backend=backend, note=f"{type(e).__name__}: {e}"))
            continue
        row = dict(op=op, case=case, backend=backend, ms=t * 1e3, kernel_ms=kernel, baseline_ms=base_s * 1e3,
                   speedup=base_s / t)
        if moved is not None:
            row["gb_s"] = moved / t / 1e9
            if kernel is not None:
                row["kernel_gb_s"] = moved / (kernel * 1e-3) / 1e9
                if bw is not None:
                    row["kernel_share_of_copy"] = moved / (kernel * 1e-3) / bw
        rows.append(row)


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
        measure("crop_patch_rows", device, reps, rows, f"box {box} -> {out_hw[0]}x{out_hw[1]}, embedded",
                lambda: ops.crop_patch_embed(on_device, box, out_hw, weight=weight), base)


def bench_kv_splice(device, reps, rows, bw, quick):
    heads, dim = 2, 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [1 << 20, 1 << 23] if quick else [1 << 20, 1 << 22, 1 << 23, 1 << 24]
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
        base = statistics.median(timed(lambda: ops.kv_splice_torch(k, v, kc, vc, slots), device, reps))
        measure("kv_splice", device, reps, rows, f"{elements:,} elements",
                lambda: ops.kv_splice(k, v, kc, vc, slots, check=False), base, moved, bw)


def bench_decode_attention(device, reps, rows, quick):
    heads, kv_heads, dim, block_size = 12, 2, 128, 16
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for B, length in ([(1, 512), (32, 1024)] if quick else [(1, 512), (1, 2048), (8, 1024), (32, 1024)]):
        if device.type != "cuda" and B > 1:
            continue
        per_seq = -(-length // block_size)
        q = torch.randn(B, heads, dim, device=device, dtype=dtype)
        kc = torch.randn(B * per_seq + 1, block_size, kv_heads, dim, device=device, dtype=dtype)
        vc = torch.randn_like(kc)
        # each sequence's blocks scattered over the cache, as a paged cache hands them out
        tables = (torch.randperm(B * per_seq, device=device) + 1).view(B, per_seq)
        lens = torch.full((B,), length, device=device)
        base = statistics.median(timed(lambda: ops.decode_attention_torch(q, kc, vc, tables, lens, dim**-0.5), device, reps))
        moved = 2 * B * length * kv_heads * dim * kc.element_size()
        measure("decode_attention", device, reps, rows, f"B={B} len={length}",
                lambda: ops.decode_attention(q, kc, vc, tables, lens, dim**-0.5, check=False), base, moved)


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
        base = statistics.median(timed(lambda: ops.prefill_attention_torch(q, kc, vc, tables, lens, cu, dim**-0.5),
                                       device, reps))
        moved = B * (2 * length * kv_heads + 2 * new * heads) * dim * kc.element_size()
        measure("prefill_attention", device, reps, rows, f"B={B} len={length} new={new}",
                lambda: ops.prefill_attention(q, kc, vc, tables, lens, cu, dim**-0.5, max_new=new, check=False), base, moved)


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
        ("op", "op"), ("case", "case"), ("backend", "backend"), ("ms", "ms, through the op"),
        ("kernel_ms", "ms, kernel only"), ("baseline_ms", "torch definition ms"), ("speedup", "x torch"),
        ("gb_s", "GB/s"), ("kernel_gb_s", "kernel GB/s"), ("kernel_share_of_copy", "kernel share of copy bw"),
        ("note", "note")])
    js, mdp = write_results("kernels", env, rows, md)
    print(f"{env['card']}\n{md}\nwrote {js}, {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
