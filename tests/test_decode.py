"""Graph-ready decoding: decode attention backends, the fixed-shape decode step, captured vs eager."""

import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run on the CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image

from vpt_fast.engine import Engine
from vpt_fast.engine.cache import KVCache
from vpt_fast.engine.decode import DecodeStep
from vpt_fast.engine.runner import Runner
from vpt_fast.ops.decode_attention import decode_attention

triton = pytest.importorskip("triton")


def manual_attention(q, k_cache, v_cache, slots, lens, scale):
    B, heads, D = q.shape
    groups = heads // k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        K, V = k_cache[slots[b], : lens[b]], v_cache[slots[b], : lens[b]]
        for h in range(heads):
            p = ((K[:, h // groups].float() @ q[b, h].float()) * scale).softmax(0)
            out[b, h] = (p @ V[:, h // groups].float()).to(q.dtype)
    return out


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (2, 2, 8), (6, 1, 32)])
def test_decode_attention_backends(heads, kv_heads, dim):
    g = torch.Generator().manual_seed(heads * dim)
    slots_n, max_len = 5, 150
    q = torch.randn(3, heads, dim, generator=g)
    k = torch.randn(slots_n, max_len, kv_heads, dim, generator=g)
    v = torch.randn(slots_n, max_len, kv_heads, dim, generator=g)
    slots = torch.tensor([4, 0, 2])
    lens = torch.tensor([1, 64, 150])
    k[0, 64:] = float("nan")  # stale entries past a length must never be read
    v[0, 64:] = float("nan")
    want = manual_attention(q, k, v, slots, lens, dim**-0.5)
    cos, sin = torch.randn(3, dim, generator=g), torch.randn(3, dim, generator=g)
    half = dim // 2
    rotated = q * cos[:, None] + torch.cat((-q[..., half:], q[..., :half]), -1) * sin[:, None]
    want_rotated = manual_attention(rotated, k, v, slots, lens, dim**-0.5)
    for backend in ("torch", "triton"):
        got = decode_attention(q, k, v, slots, lens, dim**-0.5, backend=backend)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5, backend
        got = decode_attention(q, k, v, slots, lens, dim**-0.5, cos, sin, backend=backend)
        assert (got - want_rotated).abs().max() <= 1e-5, backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_and_gate_kernels(dtype):
    from vpt_fast.ops.norm import add_rms_norm, add_rms_norm_reference, silu_mul, silu_mul_reference

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 96, generator=g).to(dtype)
    res = torch.randn(3, 96, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    def close(got, want):
        # bf16: within 4 units in the last place (Triton's interpreter truncates at each of the rounding points)
        err = (got.float() - want.float()).abs()
        bound = 1e-5 if dtype == torch.float32 else 4 * 2**-7 * want.float().abs() + 1e-3
        return bool((err <= bound).all())

    for residual in (None, res):
        want_sum, want = add_rms_norm_reference(x, residual, w, 1e-6)
        got_sum, got = add_rms_norm(x, residual, w, 1e-6, backend="triton")
        assert close(got_sum, want_sum) and close(got, want)
    gate, up = torch.randn(2, 200, generator=g).to(dtype), torch.randn(2, 200, generator=g).to(dtype)
    assert close(silu_mul(gate, up, backend="triton"), silu_mul_reference(gate, up))


def test_decode_attention_errors():
    q = torch.randn(2, 4, 8)
    k = torch.randn(3, 10, 2, 8)
    with pytest.raises(ValueError, match="query heads"):
        decode_attention(torch.randn(2, 3, 8), k, k, torch.tensor([0, 1]), torch.tensor([1, 1]), 1.0)
    with pytest.raises(ValueError, match="slots and seq_lens must be"):
        decode_attention(q, k, k, torch.tensor([0]), torch.tensor([1, 1]), 1.0)
    with pytest.raises(ValueError, match="q is torch.float32, the cache torch.bfloat16"):
        decode_attention(q, k.bfloat16(), k.bfloat16(), torch.tensor([0, 1]), torch.tensor([1, 1]), 1.0)


def test_decode_step_equals_general_forward(tiny_bundle):
    """The fixed-shape decode path (graph-ready, run uncaptured here) equals the general ragged forward."""
    b = tiny_bundle("clip")
    runner = Runner(b.model)
    cfg = b.model.config.text_config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    caches = [KVCache(shape[0], 4, 64, shape[1], shape[2], torch.float32, "cpu") for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(50, 300, (n,), generator=g) for n in (7, 12, 3)]
    for cache in caches:
        for slot, ids in zip((2, 0, 1), prompts):
            pos = torch.arange(len(ids))[None, None].expand(3, 1, -1)
            runner.forward(runner.embed(ids[None]), pos, cache, torch.tensor([slot]), torch.tensor([len(ids)]))
    step = DecodeStep(runner, caches[0], use_graphs=False)
    tokens = [11, 22, 33]
    control = torch.randn(cfg.hidden_size, generator=g)
    for it in range(3):
        positions = [len(p) + it for p in prompts]
        overrides = [None, control if it == 1 else None, None]
        logits, hidden = step(tokens, overrides, positions, [2, 0, 1])
        embeds = runner.embed(torch.tensor(tokens)[:, None])
        if overrides[1] is not None:
            embeds[1, 0] = control
        pos = torch.tensor(positions)[None, :, None].expand(3, -1, 1)
        ref_hidden = runner.forward(embeds, pos, caches[1], torch.tensor([2, 0, 1]), torch.ones(3, dtype=torch.long))
        assert (hidden - ref_hidden[:, 0]).abs().max() <= 1e-5
        assert (logits - runner.logits(ref_hidden[:, 0])).abs().max() <= 1e-4
        assert torch.equal(caches[0].lengths[:3], caches[1].lengths[:3])
        tokens = logits.argmax(-1).tolist()


def test_engine_in_chunks_equals_one_batch(tiny_bundle):
    b = tiny_bundle("region")
    tok = b.tokenizer
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(5)]
    forced = [tok("<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>", add_special_tokens=False)["input_ids"]
              if i % 2 else None for i in range(5)]
    prompts = [f"Question {i}?" for i in range(5)]
    whole = Engine(b, max_batch_size=8).generate(images, prompts, 8, forced)
    chunked = Engine(b, max_batch_size=2).generate(images, prompts, 8, forced)
    assert [r.token_ids for r in whole] == [r.token_ids for r in chunked]
    engine = Engine(b, max_batch_size=2)
    again = [engine.generate(images, prompts, 8, forced) for _ in range(2)]  # the cache is reused across calls
    assert [r.token_ids for r in again[0]] == [r.token_ids for r in again[1]] == [r.token_ids for r in whole]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["region", "clip"])
def test_captured_decode_equals_eager_on_gpu(tiny_ckpt, variant):
    from vpt_fast.checkpoint import load_vpt_checkpoint

    b = load_vpt_checkpoint(tiny_ckpt(variant), device="cuda")
    tok = b.tokenizer
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (60 + 20 * i, 90, 3), dtype=np.uint8)) for i in range(3)]
    text = "<|clip_action_start|><|clip_action|><|clip_action_end|><|im_end|>" if variant == "clip" else \
        "<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>"
    forced = [tok(text, add_special_tokens=False)["input_ids"], None, None]
    eager = Engine(b, cuda_graphs=False).generate(images, ["a", "b", "c"], 12, forced, return_logits=True)
    graphs = Engine(b, cuda_graphs=True).generate(images, ["a", "b", "c"], 12, forced, return_logits=True)
    for e, g in zip(eager, graphs):
        assert e.token_ids == g.token_ids
        assert max((x - y).abs().max().item() for x, y in zip(e.logits, g.logits)) <= 1e-4
    engine = Engine(b)
    sampled = [engine.generate(images, ["a", "b", "c"], 8, forced, do_sample=True, top_k=10, top_p=0.9, seed=3)
               for _ in range(2)]
    assert [r.token_ids for r in sampled[0]] == [r.token_ids for r in sampled[1]]
