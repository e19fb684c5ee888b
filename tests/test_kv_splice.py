"""kv_splice, every backend (torch definition, Triton, the extension's C++/CUDA kernels) against a
per-token loop and the definition: values, casts and rotations bit for bit where the
arithmetic allows, keys rotated like transformers' own Qwen2-VL code, odd and strided inputs,
argument errors, opcheck and torch.compile. The Triton kernels run in Triton's interpreter on
the CPU (small shapes; bf16 conversions only on the GPU, as the interpreter truncates where
the GPU and torch round to nearest even); `-m gpu` adds the CUDA cases.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import (
    assert_bits_equal,
    assert_same_values,
    reference_caches,
    runnable,
    splice_inputs,
    splice_with_reference,
    use_backend,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from vpt_fast.ops import kv_splice
from vpt_fast.ops.kv_splice import IMPLEMENTATIONS

BACKENDS = ["torch", "triton", "ext"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def implementation(backend: str, device_type: str = "cpu"):
    runnable("kv_splice", backend, device_type)
    return IMPLEMENTATIONS[backend]


def _loop_splice(k, v, k_cache, v_cache, slot_mapping):
    """The contract, one token at a time: expected caches after writing k/v (already rotated)."""
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for n, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, off = slot // block_size, slot % block_size
        k_exp[block, off] = k[n].to(k_cache.dtype)
        v_exp[block, off] = v[n].to(v_cache.dtype)
    return k_exp, v_exp


# ----------------------------------------------------------------------------- values, every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("cache_dtype,new_dtype", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"),
                                                  ("bf16", "fp32"), ("fp16", "fp32")])
def test_copies_match_a_per_token_loop(backend, tokens, cache_dtype, new_dtype):
    if backend == "triton" and (cache_dtype, new_dtype) == ("bf16", "fp32") and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter truncates float32 to bfloat16 (the GPU rounds to nearest)")
    splice = implementation(backend)
    gen = torch.Generator().manual_seed(tokens * 31 + len(cache_dtype))
    for layout in ("engine", "paged"):
        for heads, dim in ((1, 8), (2, 16), (3, 24), (4, 64)):
            k, v, k_cache, v_cache, slots, _, _ = splice_inputs(layout, tokens, heads, dim, gen,
                                                                in_dtype=DTYPES[new_dtype], cache_dtype=DTYPES[cache_dtype])
            k_exp, v_exp = _loop_splice(k, v, k_cache, v_cache, slots)
            splice(k, v, k_cache, v_cache, slots)
            what = f"{layout} heads={heads} dim={dim}"
            assert_same_values(k_cache, k_exp, f"k {what}")
            assert_same_values(v_cache, v_exp, f"v {what}")
            assert int((~k_cache.isnan()).all(-1).all(-1).sum()) == int((slots >= 0).sum()), what


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 7, 37])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_keys_are_rotated_like_transformers(tiny_bundle, backend, tokens, heads):
    splice = implementation(backend)
    bundle = tiny_bundle("region")
    cfg = bundle.model.config.text_config
    dim = cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(tokens * 7 + heads)
    pad = 2
    positions = torch.randint(0, 200, (3, 1, tokens + pad), generator=gen)
    cos, sin = bundle.model.model.language_model.rotary_emb(torch.zeros(1), positions)
    cos, sin = cos[0], sin[0]
    q = torch.randn(1, tokens + pad, heads, dim, generator=gen)
    k = torch.randn(1, tokens + pad, heads, dim, generator=gen)
    v = torch.randn(tokens + pad, heads, dim, generator=gen)
    _, k_rot = apply_rotary_pos_emb(q, k, cos[None], sin[None], unsqueeze_dim=2)
    _, _, k_cache, v_cache, slots, _, _ = splice_inputs("paged", tokens, heads, dim, gen, skip=0.2)
    k_exp, v_exp = _loop_splice(k_rot[0], v, k_cache, v_cache, slots)
    splice(k[0], v, k_cache, v_cache, slots, cos, sin)
    assert torch.equal(k_cache.nan_to_num(7.0), k_exp.nan_to_num(7.0)), "keys differ from apply_rotary_pos_emb"
    assert torch.equal(v_cache.nan_to_num(7.0), v_exp.nan_to_num(7.0)), "values must be copied, never rotated"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["engine", "paged"])
@pytest.mark.parametrize("rotate", [False, True], ids=["copy", "rotate"])
@pytest.mark.parametrize("tokens", [1, 7, 37])
def test_float32_equals_the_definition_bit_for_bit(backend, layout, rotate, tokens):
    splice = implementation(backend)
    args = splice_inputs(layout, tokens, 4, 64, torch.Generator().manual_seed(tokens), rotate=rotate)
    k_exp, v_exp = splice_with_reference(splice, *args)
    assert_bits_equal(args[2], k_exp, "k_cache")
    assert_bits_equal(args[3], v_exp, "v_cache")
    assert args[2].isnan().any()  # untouched slots keep their poison


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Keys/values sliced from a fused projection, heads-major values, tables cut from wider rows
    and a non-unit innermost stride all read the same values."""
    splice = implementation(backend)
    gen = torch.Generator().manual_seed(5)
    tokens, heads, dim = 21, 3, 32
    _, _, k_cache, v_cache, slots, _, _ = splice_inputs("paged", tokens, heads, dim, gen, pad=0)
    qkv = torch.randn(tokens + 2, 3, heads, dim, generator=gen)
    v_new = torch.randn(heads, tokens + 2, dim, generator=gen).transpose(0, 1)
    tables = torch.randn(tokens + 2, 2 * dim, generator=gen)
    k_exp, v_exp = splice_with_reference(splice, qkv[:, 1], v_new, k_cache, v_cache, slots, tables[:, :dim], tables[:, dim:])
    assert_bits_equal(k_cache, k_exp, "k_cache")
    assert_bits_equal(v_cache, v_exp, "v_cache")
    every_other = torch.randn(tokens, heads, 2 * dim, generator=gen)[..., ::2]
    k_exp, v_exp = splice_with_reference(splice, every_other, every_other, k_cache, v_cache, slots)
    assert_bits_equal(k_cache, k_exp, "k_cache, strided head_dim")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_slots_or_all_skipped_writes_nothing(backend):
    splice = implementation(backend)
    k, v, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 9, 2, 8, torch.Generator().manual_seed(1), rotate=True)
    splice(k, v, k_cache, v_cache, slots[:0], None, None)
    splice(k, v, k_cache, v_cache, torch.full_like(slots, -1), cos, sin)
    assert k_cache.isnan().all() and v_cache.isnan().all()


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("in_dtype,cache_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float16, torch.float32),
    (torch.float64, torch.float32),
])
def test_casts_bit_for_bit(backend, in_dtype, cache_dtype):
    """Copies and casts match the definition bit for bit; so do rotations where the definition
    rotates in the kernel's own precision (float32 or wider inputs: not float16)."""
    splice = implementation(backend)
    gen = torch.Generator().manual_seed(2)
    for rotate in (False, True) if in_dtype != torch.float16 else (False,):
        args = splice_inputs("paged", 29, 2, 32, gen, in_dtype=in_dtype, cache_dtype=cache_dtype, rotate=rotate)
        k_exp, v_exp = splice_with_reference(splice, *args)
        assert_bits_equal(args[2], k_exp, f"k_cache rotate={rotate}")
        assert_bits_equal(args[3], v_exp, f"v_cache rotate={rotate}")


@pytest.mark.parametrize("backend", ["ext"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keys_rotate_in_float32(backend, dtype):
    """Half-precision keys are rotated in float32 and rounded once: the definition run on the same
    values in float32 and cast, and no further from the exact rotation than the definition run in
    `dtype` (which rounds each product and the sum)."""
    splice = implementation(backend)
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 45, 4, 64, torch.Generator().manual_seed(3),
                                                                    in_dtype=dtype, cache_dtype=dtype, rotate=True)
    k_low, v_low = reference_caches(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    k_exact, _ = reference_caches(k_new.float(), v_new.float(), k_cache.float(), v_cache.float(), slots, cos.float(), sin.float())
    splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exact.to(dtype), "k_cache vs float32 rotation")
    assert_bits_equal(v_cache, v_low, "v_cache")
    written = ~k_exact.isnan()
    assert (k_cache.float() - k_exact)[written].abs().max() <= (k_low.float() - k_exact)[written].abs().max()


def test_inputs_are_left_alone():
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 8, generator=gen)
    cos, sin = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    slots = torch.tensor([3, -1, 0, 7, 9], dtype=torch.int64)
    before = [t.clone() for t in (k, v, cos, sin, slots)]
    kv_splice(k, v, torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8), slots, cos, sin)
    for t, b in zip((k, v, cos, sin, slots), before):
        assert torch.equal(t, b)


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_runs_the_chosen_backend(monkeypatch, backend):
    use_backend(monkeypatch, "kv_splice", backend)
    calls = []
    monkeypatch.setitem(IMPLEMENTATIONS, backend, lambda *args: calls.append(args) or None)
    args = splice_inputs("paged", 6, 2, 8, torch.Generator().manual_seed(6), rotate=True)
    kv_splice(*args)
    torch.ops.vpt_fast.kv_splice(*args)
    assert len(calls) == 2


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_opcheck(monkeypatch, backend):
    """Schema, fake tensors and AOT dispatch (Triton's interpreter cannot run on fake tensors: the
    Triton backend is checked on the GPU)."""
    use_backend(monkeypatch, "kv_splice", backend)
    k, v, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 6, 2, 8, torch.Generator().manual_seed(6), rotate=True)
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    torch.library.opcheck(torch.ops.vpt_fast.kv_splice.default, (k, v, k_cache, v_cache, slots, cos, sin))


# ----------------------------------------------------------------------------- argument errors


def _nan(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def _args(tokens=4, heads=2, dim=8, blocks=2, block_size=8, dtype=torch.float32):
    return dict(k_new=torch.randn(tokens, heads, dim).to(dtype), v_new=torch.randn(tokens, heads, dim).to(dtype),
                k_cache=_nan((blocks, block_size, heads, dim), dtype), v_cache=_nan((blocks, block_size, heads, dim), dtype),
                slot_mapping=torch.arange(tokens, dtype=torch.int64))


def _bad_cases():
    a = _args()
    d = lambda **kw: {**_args(), **kw}  # noqa: E731
    non_contiguous = torch.full((8, 2, 2, 8), float("nan")).transpose(0, 1)
    return {
        "k_new 2-D": (ValueError, "k_new and v_new", d(k_new=a["k_new"][:, 0], v_new=a["v_new"][:, 0])),
        "k/v shapes": (ValueError, "k_new and v_new", d(v_new=torch.randn(4, 2, 16))),
        "cache 3-D": (ValueError, "caches must both be", d(k_cache=_nan((16, 2, 8)), v_cache=_nan((16, 2, 8)))),
        "k/v cache shapes": (ValueError, "caches must both be", d(v_cache=_nan((2, 8, 2, 16)))),
        "cache heads": (ValueError, "cache heads/dim", d(k_cache=_nan((2, 8, 4, 8)), v_cache=_nan((2, 8, 4, 8)))),
        "cache head_dim": (ValueError, "cache heads/dim", d(k_cache=_nan((2, 8, 2, 16)), v_cache=_nan((2, 8, 2, 16)))),
        "non-contiguous cache": (ValueError, "contiguous", d(k_cache=non_contiguous)),
        "int32 slots": (ValueError, "1-D int64", d(slot_mapping=torch.arange(4, dtype=torch.int32))),
        "2-D slots": (ValueError, "1-D int64", d(slot_mapping=torch.arange(4, dtype=torch.int64)[None])),
        "more slots than tokens": (ValueError, "5 slots for 4 new tokens", d(slot_mapping=torch.arange(5, dtype=torch.int64))),
        "k/v dtypes": (ValueError, "dtypes differ", d(v_new=a["v_new"].half())),
        "cache dtypes": (ValueError, "dtypes differ", d(v_cache=_nan((2, 8, 2, 8), torch.bfloat16))),
        "slot past capacity": (ValueError, r"\[0, 16\)", d(slot_mapping=torch.tensor([0, 1, 16, 2]))),
        "slot below -1": (ValueError, r"-1 \(skip\)", d(slot_mapping=torch.tensor([0, -2, 1, 2]))),
        "cos without sin": (ValueError, "both cos and sin", d(cos=torch.ones(4, 8))),
        "sin without cos": (ValueError, "both cos and sin", d(sin=torch.ones(4, 8))),
        "cos too short": (ValueError, "cos/sin must be", d(cos=torch.ones(3, 8), sin=torch.ones(3, 8))),
        "cos width": (ValueError, "cos/sin must be", d(cos=torch.ones(4, 4), sin=torch.ones(4, 4))),
        "cos 3-D": (ValueError, "cos/sin must be", d(cos=torch.ones(1, 4, 8), sin=torch.ones(1, 4, 8))),
        "cos/sin shapes": (ValueError, "cos/sin must be", d(cos=torch.ones(4, 8), sin=torch.ones(5, 8))),
        "list slots": (TypeError, "slot_mapping must be a tensor", d(slot_mapping=[0, 1, 2, 3])),
        "numpy k": (TypeError, "k_new must be a tensor", d(k_new=a["k_new"].numpy())),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_are_refused_before_writing(case):
    error, match, args = BAD[case]
    caches = (args["k_cache"], args["v_cache"])
    before = [c.clone() for c in caches]
    with pytest.raises(error, match=match):
        kv_splice(**args)
    for c, b in zip(caches, before):
        assert_same_values(c, b, f"{case}: cache written before the error")


def test_tensors_on_different_devices_are_refused():
    args = _args()
    with pytest.raises(ValueError, match="one device"):
        kv_splice(**{**args, "k_cache": torch.empty(2, 8, 2, 8, device="meta")})
    with pytest.raises(ValueError, match="one device"):
        kv_splice(**args, cos=torch.ones(4, 8, device="meta"), sin=torch.ones(4, 8, device="meta"))
    assert bool(args["k_cache"].isnan().all())


# ----------------------------------------------------------------------------- the extension's own checks


@pytest.fixture
def ext():
    runnable("kv_splice", "ext")
    return torch.ops.vpt_fast_ext


def test_ext_meta_kernel(ext):
    k = torch.empty(5, 2, 8, device="meta")
    cache = torch.empty(4, 16, 2, 8, device="meta")
    ext.kv_splice(k, k, cache, cache.clone(), torch.empty(5, dtype=torch.int64, device="meta"), None, None)
    with pytest.raises(RuntimeError, match="slot_mapping must be int64"):
        ext.kv_splice(k, k, cache, cache.clone(), torch.empty(5, dtype=torch.int32, device="meta"), None, None)


@pytest.mark.parametrize("change,message", [
    (lambda a: {"slot_mapping": a["slot_mapping"].int()}, "slot_mapping must be int64, got Int"),
    (lambda a: {"slot_mapping": a["slot_mapping"][None]}, "slot_mapping must be 1-D"),
    (lambda a: {"slot_mapping": torch.zeros(11, dtype=torch.int64)}, "11 slots for 10 new tokens"),
    (lambda a: {"slot_mapping": torch.tensor([0, 1, 40000])}, r"slot_mapping\[2\] = 40000 is neither -1"),
    (lambda a: {"slot_mapping": torch.tensor([0, -2])}, r"slot_mapping\[1\] = -2 is neither -1"),
    (lambda a: {"k_cache": a["k_cache"][0], "v_cache": a["v_cache"][0]},
     r"k_cache must be \(blocks, block_size, kv_heads, head_dim\)"),
    (lambda a: {"k_cache": a["k_cache"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
                "v_cache": a["v_cache"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)},
     "k_cache and v_cache must be contiguous"),
    (lambda a: {"k_cache": a["k_cache"].double(), "v_cache": a["v_cache"].double()},
     "k_cache must be float32, float16 or bfloat16, got Double"),
    (lambda a: {"v_cache": a["v_cache"].half()}, "v_cache must have k_cache's dtype Float"),
    (lambda a: {"k_new": a["k_new"][..., :4], "v_new": a["v_new"][..., :4]}, "must match k_new's"),
    (lambda a: {"v_new": a["v_new"][:5]}, "v_new must have k_new's shape"),
    (lambda a: {"k_new": a["k_new"].int(), "v_new": a["v_new"].int()}, "k_new must be a floating point tensor"),
    (lambda a: {"sin": None}, "give both cos and sin, or neither"),
    (lambda a: {"cos": a["cos"][:, :4], "sin": a["sin"][:, :4]}, r"cos must be \(tokens >= 7, 8\)"),
    (lambda a: {"cos": a["cos"][:3], "sin": a["sin"][:3]}, r"cos must be \(tokens >= 7, 8\)"),
    (lambda a: {"sin": a["sin"].double()}, "sin must have cos's dtype Float"),
], ids=["slots-int32", "slots-2d", "too-many-slots", "slot-past-end", "slot-below-minus-one", "cache-3d",
        "cache-noncontiguous", "cache-double", "cache-dtypes-differ", "head-dim-mismatch", "v-shape",
        "k-int", "cos-without-sin", "cos-width", "cos-rows", "sin-dtype"])
def test_ext_checks_its_arguments(ext, change, message):
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 7, 2, 8, torch.Generator().manual_seed(0),
                                                                    rotate=True)
    args = dict(k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots, cos=cos, sin=sin)
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        ext.kv_splice(**args)


# ----------------------------------------------------------------------------- GPU


GPU_BACKENDS = ["triton", "ext"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dim", [64, 72, 10, 128], ids=["dim64", "dim72", "dim10-scalar", "dim128"])
def test_gpu_float32_bit_exact(backend, dim):
    splice = implementation(backend, "cuda")
    gen = torch.Generator().manual_seed(dim)
    for layout in ("engine", "paged"):
        for tokens in (1, 37, 300):
            for rotate in (False, True):
                args = splice_inputs(layout, tokens, 4, dim, gen, rotate=rotate, device="cuda")
                k_exp, v_exp = splice_with_reference(splice, *args)
                what = f"{backend} {layout} tokens={tokens} rotate={rotate}"
                assert_bits_equal(args[2], k_exp, f"k_cache {what}")
                assert_bits_equal(args[3], v_exp, f"v_cache {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_large(backend, cache_dtype):
    """4096 tokens x 8 heads x 128 (4.2M elements per cache) into a paged cache, keys rotated."""
    splice = implementation(backend, "cuda")
    args = splice_inputs("paged", 4096, 8, 128, torch.Generator().manual_seed(10), cache_dtype=cache_dtype, rotate=True,
                         skip=0.05, device="cuda")
    k_exp, v_exp = splice_with_reference(splice, *args)
    assert_bits_equal(args[2], k_exp, "k_cache")
    assert_bits_equal(args[3], v_exp, "v_cache")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [128, 72], ids=["vectorized", "scalar"])
def test_gpu_half_precision(backend, dtype, dim):
    """Half-precision keys rotated in float32 and rounded once: the float32 definition, cast."""
    splice = implementation(backend, "cuda")
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 301, 8, dim, torch.Generator().manual_seed(4),
                                                                    in_dtype=dtype, cache_dtype=dtype, rotate=True,
                                                                    device="cuda")
    _, v_exp = reference_caches(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    k_exact, _ = reference_caches(k_new.float(), v_new.float(), k_cache.float(), v_cache.float(), slots, cos.float(), sin.float())
    splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exact.to(dtype), "k_cache vs float32 rotation")
    assert_bits_equal(v_cache, v_exp, "v_cache")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_strided_and_misaligned(backend):
    splice = implementation(backend, "cuda")
    tokens, heads, dim = 53, 4, 64
    _, _, k_cache, v_cache, slots, _, _ = splice_inputs("paged", tokens, heads, dim, torch.Generator().manual_seed(5), pad=0,
                                                        device="cuda")
    qkv = torch.randn(tokens + 2, 3, heads, dim, device="cuda")
    v_new = torch.randn(heads, tokens + 2, dim, device="cuda").transpose(0, 1)
    tables = torch.randn(tokens + 2, 2 * dim, device="cuda")
    cos, sin = tables[:, :dim], tables[:, dim:]
    k_exp, v_exp = splice_with_reference(splice, qkv[:, 1], v_new, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exp, "k_cache, strided")
    assert_bits_equal(v_cache, v_exp, "v_cache, strided")
    shifted = torch.randn(tokens * heads * dim + 1, device="cuda")[1:].view(tokens, heads, dim)  # past a 16-byte boundary
    k_exp, v_exp = splice_with_reference(splice, shifted, shifted, k_cache, v_cache, slots, cos, sin)
    assert_bits_equal(k_cache, k_exp, "k_cache, misaligned")


@pytest.mark.gpu
def test_gpu_ext_matches_the_cpu_kernel():
    cpu, cuda = implementation("ext"), implementation("ext", "cuda")
    args = splice_inputs("paged", 77, 2, 64, torch.Generator().manual_seed(7), rotate=True)
    cuda_args = [t.cuda() for t in args]
    cpu(*args)
    cuda(*cuda_args)
    assert_bits_equal(cuda_args[2].cpu(), args[2], "k_cache")
    assert_bits_equal(cuda_args[3].cpu(), args[3], "v_cache")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_graph_replay_through_the_op(monkeypatch, backend):
    """Captured once through torch.ops.vpt_fast.kv_splice, replayed with new inputs copied in."""
    use_backend(monkeypatch, "kv_splice", backend, "cuda")
    k_new, v_new, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 16, 2, 64, torch.Generator().manual_seed(8),
                                                                    rotate=True, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        kv_splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_splice(k_new, v_new, k_cache, v_cache, slots, cos, sin)
    fresh = splice_inputs("paged", 16, 2, 64, torch.Generator().manual_seed(9), rotate=True, device="cuda")
    for static, new in zip((k_new, v_new, k_cache, v_cache, slots, cos, sin), fresh):
        static.copy_(new)
    k_exp, v_exp = reference_caches(*fresh)
    graph.replay()
    assert_bits_equal(k_cache, k_exp, "k_cache after replay")
    assert_bits_equal(v_cache, v_exp, "v_cache after replay")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_opcheck(monkeypatch, backend):
    use_backend(monkeypatch, "kv_splice", backend, "cuda")
    k, v, k_cache, v_cache, slots, cos, sin = splice_inputs("paged", 6, 2, 8, torch.Generator().manual_seed(6), rotate=True,
                                                            device="cuda")
    torch.library.opcheck(torch.ops.vpt_fast.kv_splice.default,
                          (k, v, k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0), slots, cos, sin))


@pytest.mark.gpu
def test_gpu_ext_device_mismatch():
    ext = implementation("ext", "cuda")
    k_new, v_new, k_cache, v_cache, slots, _, _ = splice_inputs("paged", 5, 2, 8, torch.Generator().manual_seed(0),
                                                                device="cuda")
    with pytest.raises(RuntimeError, match="slot_mapping is on cpu but k_cache is on cuda"):
        ext(k_new, v_new, k_cache, v_cache, slots.cpu(), None, None)
