"""Run as a script in a fresh process (tests/test_compile.py): torch.compile(fullgraph=True) of every
public op and of the engine's decode step, each compared with its eager result. The first
argument names the device ("cpu" by default; "cuda" compiles the backend chosen there, e.g. the
Triton kernels with VPT_FAST_BACKEND=triton)."""

from __future__ import annotations

import sys

import numpy as np
import torch

import vpt_fast.ops as ops
from vpt_fast.preprocess import CLIP_MEAN, CLIP_STD


DEVICE = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")


def on(*tensors):
    """The tensors on DEVICE (made on the CPU with its seeded generators)."""
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


def compiled_equals_eager(name, fn, make_args, atol=1e-5):
    eager_args, compiled_args = make_args(), make_args()
    want = fn(*eager_args)
    got = torch.compile(fn, fullgraph=True)(*compiled_args)
    flat_want = want if isinstance(want, (tuple, list)) else (want,)
    flat_got = got if isinstance(got, (tuple, list)) else (got,)
    for w, g in zip(flat_want, flat_got):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    print(f"compiled: {name}", flush=True)


def paged(lens, block_size=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    k = torch.randn(sum(need) + 1, block_size, kv_heads, dim, generator=g)
    v = torch.randn(sum(need) + 1, block_size, kv_heads, dim, generator=g)
    order = (torch.randperm(sum(need), generator=g) + 1).tolist()
    tables = [[order.pop() for _ in range(m)] + [0] * (max(need) - m) for m in need]
    return on(k, v, torch.tensor(tables), torch.tensor(lens))


def main() -> int:
    g = torch.Generator().manual_seed(0)

    def splice_args():
        gen = torch.Generator().manual_seed(1)
        k, v = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
        return on(k, v, torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8), torch.tensor([0, 1, 5, -1, 9]),
                  torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen))

    def splice(k, v, kc, vc, slots, cos, sin):
        ops.kv_splice(k * 2, v, kc, vc, slots, cos, sin)
        return kc, vc

    compiled_equals_eager("kv_splice", splice, splice_args)

    k, v, tables, lens = paged([3, 9])
    q, cos, sin = on(torch.randn(2, 4, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g))
    compiled_equals_eager("decode_attention", lambda *a: ops.decode_attention(*a, 0.25, cos, sin),
                          lambda: (q, k, v, tables, lens))
    qp, cu = on(torch.randn(7, 4, 16, generator=g), torch.tensor([0, 3, 7]))
    compiled_equals_eager("prefill_attention", lambda *a: ops.prefill_attention(*a, 0.25, max_new=4),
                          lambda: (qp, k, v, tables, lens, cu))
    x, r, w = on(torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g), torch.randn(32, generator=g))
    compiled_equals_eager("add_rms_norm", lambda *a: ops.add_rms_norm(*a, 1e-6), lambda: (x, r, w))
    compiled_equals_eager("rms_norm", lambda x, w: ops.add_rms_norm(x, None, w, 1e-6)[1], lambda: (x, w))
    compiled_equals_eager("silu_mul", ops.silu_mul, lambda: (x, r))
    image = on(torch.randint(0, 256, (30, 70, 3), dtype=torch.uint8, generator=g))
    tables_rows = ops.resample_tables(30, 70, (2, 1, 69, 30), (28, 56), device=DEVICE)
    mean, std = on(torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
    compiled_equals_eager("crop_patch_rows", lambda im: ops.crop_patch_rows(im, *tables_rows, mean, std, 14, 2),
                          lambda: (image,))
    weight = on(torch.randn(8, 3, 2, 14, 14, generator=g))
    compiled_equals_eager("crop_patch_embed", lambda im, w: ops.crop_patch_embed(im, (2, 1, 69, 30), (28, 56), weight=w),
                          lambda: (image, weight), atol=1e-4)

    # the engine's decode step on the tiny model
    import tempfile

    from vpt_fast.checkpoint import load_vpt_checkpoint
    from vpt_fast.engine import Engine
    from vpt_fast.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        bundle = load_vpt_checkpoint(make_tiny_checkpoint(folder, "clip"), device=DEVICE)
    engine = Engine(bundle, kv_cache_tokens=256, cuda_graphs=False)
    blocks = engine.cache.allocate(2)
    step = engine._decoder
    args = ([5, 7], [None, bundle.model.model.language_model.embed_tokens.weight[9].detach()], [3, 4],
            engine.cache.slots(blocks, 3, 4) + engine.cache.slots(blocks, 4, 5), [4, 5],
            np.array([blocks + [0] * (engine._decoder.max_blocks - 2)] * 2))
    step(*args)
    buf = step._buffers[2]
    eager_logits = buf.logits.clone()
    buf.logits.zero_()
    torch.compile(step._body, fullgraph=True)(buf)
    torch.testing.assert_close(buf.logits, eager_logits, atol=1e-4, rtol=1e-5)
    print("compiled: the engine's decode step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
