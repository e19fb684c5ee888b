"""The ops against independent definitions: kv_splice against a per-token loop (keys rotated by
transformers' own Qwen2-VL rotary code), mrope_positions against transformers' get_rope_index.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from ext_cases import assert_same_values

from vpt_fast.ops import BackendUnavailable, kv_splice, mrope_positions
from vpt_fast.ops._dispatch import device_backends

BLOCK = 16  # paged layout block size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- helpers


def _nan(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def _caches(layout: str, tokens: int, heads: int, dim: int, dtype: torch.dtype):
    """NaN-filled (k_cache, v_cache) of the engine's layout (slots, max_len, ...) or a paged one."""
    if layout == "engine":
        shape = (4, 24, heads, dim)
    else:
        shape = (math.ceil(tokens / BLOCK) + 2, BLOCK, heads, dim)
    return _nan(shape, dtype), _nan(shape, dtype)


def _slot_mapping(layout: str, cache_shape, tokens: int, gen: torch.Generator, skip_fraction: float = 0.0):
    """Flat int64 slots for `tokens` tokens, some set to -1 (skip)."""
    blocks, block_size = cache_shape[:2]
    if layout == "engine":
        # a ragged batch: runs of consecutive positions after each slot's current length,
        # the slots visited in a random order
        counts = [tokens // blocks + (i < tokens % blocks) for i in range(blocks)]
        parts = []
        for slot in torch.randperm(blocks, generator=gen).tolist():
            start = int(torch.randint(0, block_size - counts[slot] + 1, (1,), generator=gen))
            parts.append(slot * block_size + start + torch.arange(counts[slot]))
        slots = torch.cat(parts)
    else:
        slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    skip = torch.rand(tokens, generator=gen) < skip_fraction
    return torch.where(skip, -1, slots).to(torch.int64)


def _loop_splice(k, v, k_cache, v_cache, slot_mapping):
    """The definition, one token at a time: expected caches after writing k/v (already rotated)."""
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for n, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, off = slot // block_size, slot % block_size
        k_exp[block, off] = k[n].to(k_cache.dtype)
        v_exp[block, off] = v[n].to(v_cache.dtype)
    return k_exp, v_exp




def _rotary(bundle, positions: torch.Tensor):
    """cos/sin (T, head_dim) of the model's own rotary embedding at 3-D positions (3, 1, T)."""
    rotary = bundle.model.model.language_model.rotary_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0], sin[0]


def _head_dim(bundle) -> int:
    cfg = bundle.model.config.text_config
    return cfg.hidden_size // cfg.num_attention_heads


# ----------------------------------------------------------------------------- kv_splice: values


SIZES = [(1, 8), (2, 16), (4, 64), (1, 64), (4, 8)]  # (kv_heads, head_dim)


@pytest.mark.parametrize("tokens", [1, 5, 16, 37])
@pytest.mark.parametrize("layout", ["engine", "paged"])
@pytest.mark.parametrize("cache_dtype,new_dtype", [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"),
                                                  ("bf16", "fp32"), ("fp16", "fp32")])
def test_kv_splice_matches_per_token_loop(layout, tokens, cache_dtype, new_dtype):
    gen = torch.Generator().manual_seed(tokens * 31 + len(layout))
    for heads, dim in SIZES:
        for pad, skip in ((0, 0.0), (3, 0.25)):
            k_cache, v_cache = _caches(layout, tokens, heads, dim, DTYPES[cache_dtype])
            slots = _slot_mapping(layout, k_cache.shape, tokens, gen, skip)
            k = torch.randn(tokens + pad, heads, dim, generator=gen).to(DTYPES[new_dtype])
            v = torch.randn(tokens + pad, heads, dim, generator=gen).to(DTYPES[new_dtype])
            k_exp, v_exp = _loop_splice(k, v, k_cache, v_cache, slots)
            kv_splice(k, v, k_cache, v_cache, slots)
            what = f"heads={heads} dim={dim} pad={pad} skip={skip}"
            assert_same_values(k_cache, k_exp, f"k {what}")
            assert_same_values(v_cache, v_exp, f"v {what}")
            written = int((slots >= 0).sum())
            assert int((~k_cache.isnan()).all(-1).all(-1).sum()) == written, what


@pytest.mark.parametrize("layout", ["engine", "paged"])
def test_kv_splice_all_skipped_or_no_slots_writes_nothing(layout):
    k_cache, v_cache = _caches(layout, 5, 2, 16, torch.float32)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    kv_splice(k, v, k_cache, v_cache, torch.full((5,), -1, dtype=torch.int64))
    kv_splice(k, v, k_cache, v_cache, torch.zeros(0, dtype=torch.int64))
    assert bool(k_cache.isnan().all()) and bool(v_cache.isnan().all())


@pytest.mark.parametrize("tokens", [1, 7, 37])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("layout", ["engine", "paged"])
def test_kv_splice_rotates_keys_like_transformers(tiny_bundle, layout, tokens, heads):
    bundle = tiny_bundle("region")
    dim = _head_dim(bundle)
    gen = torch.Generator().manual_seed(tokens * 7 + heads)
    pad = 2
    positions = torch.randint(0, 200, (3, 1, tokens + pad), generator=gen)
    cos, sin = _rotary(bundle, positions)
    q = torch.randn(1, tokens + pad, heads, dim, generator=gen)
    k = torch.randn(1, tokens + pad, heads, dim, generator=gen)
    v = torch.randn(tokens + pad, heads, dim, generator=gen)
    _, k_rot = apply_rotary_pos_emb(q, k, cos[None], sin[None], unsqueeze_dim=2)
    k_rot = k_rot[0]

    k_cache, v_cache = _caches(layout, tokens, heads, dim, torch.float32)
    slots = _slot_mapping(layout, k_cache.shape, tokens, gen, skip_fraction=0.2)
    k_exp, v_exp = _loop_splice(k_rot, v, k_cache, v_cache, slots)
    kv_splice(k[0], v, k_cache, v_cache, slots, cos, sin)
    assert torch.equal(k_cache.nan_to_num(7.0), k_exp.nan_to_num(7.0)), "keys differ from apply_rotary_pos_emb"
    assert torch.equal(v_cache.nan_to_num(7.0), v_exp.nan_to_num(7.0)), "values must be copied, never rotated"

    # a bf16 cache holds the fp32 rotation rounded once
    k16, v16 = _caches(layout, tokens, heads, dim, torch.bfloat16)
    k_exp, v_exp = _loop_splice(k_rot, v, k16, v16, slots)
    kv_splice(k[0], v, k16, v16, slots, cos, sin)
    assert_same_values(k16, k_exp, "bf16 keys")
    assert_same_values(v16, v_exp, "bf16 values")


def test_kv_splice_leaves_its_inputs_alone():
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 8, generator=gen)
    cos, sin = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    slots = torch.tensor([3, -1, 0, 7, 9], dtype=torch.int64)
    before = [t.clone() for t in (k, v, cos, sin, slots)]
    kv_splice(k, v, torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8), slots, cos, sin)
    for t, b in zip((k, v, cos, sin, slots), before):
        assert torch.equal(t, b)


# ----------------------------------------------------------------------------- kv_splice: errors


def _args(tokens=4, heads=2, dim=8, blocks=2, block_size=8, dtype=torch.float32):
    return dict(
        k_new=torch.randn(tokens, heads, dim).to(dtype),
        v_new=torch.randn(tokens, heads, dim).to(dtype),
        k_cache=_nan((blocks, block_size, heads, dim), dtype),
        v_cache=_nan((blocks, block_size, heads, dim), dtype),
        slot_mapping=torch.arange(tokens, dtype=torch.int64),
    )


def _bad_cases():
    a = _args()
    d = lambda **kw: {**_args(), **kw}  # noqa: E731
    non_contiguous = torch.full((8, 2, 2, 8), float("nan")).transpose(0, 1)
    return {
        "k_new 2-D": (ValueError, "k_new and v_new", d(k_new=a["k_new"][:, 0], v_new=a["v_new"][:, 0])),
        "k/v shapes": (ValueError, "k_new and v_new", d(v_new=torch.randn(4, 2, 16))),
        "cache 3-D": (ValueError, "caches must both be", d(k_cache=_nan((16, 2, 8), torch.float32),
                                                          v_cache=_nan((16, 2, 8), torch.float32))),
        "k/v cache shapes": (ValueError, "caches must both be", d(v_cache=_nan((2, 8, 2, 16), torch.float32))),
        "cache heads": (ValueError, "cache heads/dim", d(k_cache=_nan((2, 8, 4, 8), torch.float32),
                                                         v_cache=_nan((2, 8, 4, 8), torch.float32))),
        "cache head_dim": (ValueError, "cache heads/dim", d(k_cache=_nan((2, 8, 2, 16), torch.float32),
                                                            v_cache=_nan((2, 8, 2, 16), torch.float32))),
        "non-contiguous cache": (ValueError, "contiguous", d(k_cache=non_contiguous)),
        "int32 slots": (ValueError, "1-D int64", d(slot_mapping=torch.arange(4, dtype=torch.int32))),
        "2-D slots": (ValueError, "1-D int64", d(slot_mapping=torch.arange(4, dtype=torch.int64)[None])),
        "more slots than tokens": (ValueError, "5 slots for 4 new tokens",
                                   d(slot_mapping=torch.arange(5, dtype=torch.int64))),
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
def test_kv_splice_rejects_bad_arguments_before_writing(case):
    error, match, args = BAD[case]
    caches = (args["k_cache"], args["v_cache"])
    before = [c.clone() for c in caches]
    with pytest.raises(error, match=match):
        kv_splice(**args)
    for c, b in zip(caches, before):
        assert_same_values(c, b, f"{case}: cache written before the error")


def test_kv_splice_rejects_tensors_on_different_devices():
    try:
        elsewhere = torch.empty(2, 8, 2, 8, device="meta")
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no meta device: {e}")
    args = _args()
    with pytest.raises(ValueError, match="one device"):
        kv_splice(**{**args, "k_cache": elsewhere})
    with pytest.raises(ValueError, match="one device"):
        kv_splice(**args, cos=torch.ones(4, 8, device="meta"), sin=torch.ones(4, 8, device="meta"))
    assert bool(args["k_cache"].isnan().all())


# ----------------------------------------------------------------------------- kv_splice: backends


def test_kv_splice_torch_backend_by_name():
    args = _args()
    kv_splice(**args, backend="torch")
    assert torch.equal(args["k_cache"].view(-1, 2, 8)[:4], args["k_new"])


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpp"])
def test_kv_splice_unavailable_backend_raises(backend, monkeypatch):
    monkeypatch.delenv("VPT_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by modules that test the Triton kernels
    status = device_backends("kv_splice", "kv_splice", "cpu")[backend]
    if status is True:
        pytest.skip(f"the {backend} backend runs here")
    args = _args()
    with pytest.raises(BackendUnavailable, match=f"'{backend}'"):
        kv_splice(**args, backend=backend)
    assert bool(args["k_cache"].isnan().all()), "a refused backend must not write"
    monkeypatch.setenv("VPT_FAST_BACKEND", backend)
    with pytest.raises(BackendUnavailable, match=f"'{backend}'"):
        kv_splice(**args)
    assert bool(args["k_cache"].isnan().all())
    # an explicit argument wins over the environment
    kv_splice(**args, backend="torch")


def test_kv_splice_unknown_backend(monkeypatch):
    monkeypatch.delenv("VPT_FAST_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        kv_splice(**_args(), backend="opencl")
    monkeypatch.setenv("VPT_FAST_BACKEND", "opencl")
    with pytest.raises(ValueError, match="'opencl'"):
        kv_splice(**_args())


def test_kv_splice_backend_from_environment(monkeypatch):
    monkeypatch.setenv("VPT_FAST_BACKEND", "torch")
    args = _args()
    kv_splice(**args)
    assert torch.equal(args["v_cache"].view(-1, 2, 8)[:4], args["v_new"])
    monkeypatch.setenv("VPT_FAST_BACKEND", "")  # empty means no request
    kv_splice(**_args())


# ----------------------------------------------------------------------------- mrope_positions


TEXT_IDS = list(range(44, 80))  # ordinary tokens of the tiny vocabulary


@st.composite
def layouts(draw, vocab):
    """(ids, grids, cuts): text runs (0..7 tokens, re-encoding pads among them) around 0..3 images
    `<|vision_start|> <|image_pad|>* <|vision_end|>`, and cut points outside the image runs."""
    text_pool = TEXT_IDS + [a.pad for a in vocab.actions.values()] + [vocab.im_start, vocab.im_end]
    n_images = draw(st.integers(0, 3))
    ids, grids, inside = [], [], set()
    for i in range(n_images + 1):
        ids += draw(st.lists(st.sampled_from(text_pool), min_size=0, max_size=7))
        if i == n_images:
            break
        a, b = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        grids.append((1, 2 * a, 2 * b))
        ids.append(vocab.vision_start)
        inside |= set(range(len(ids) + 1, len(ids) + a * b))  # cutting there splits the run
        ids += [vocab.image_pad] * (a * b)
        ids.append(vocab.vision_end)
    allowed = [c for c in range(1, len(ids)) if c not in inside]
    cuts = sorted(draw(st.sets(st.sampled_from(allowed), max_size=5))) if allowed else []
    return ids, grids, cuts


def _stock_positions(bundle, ids: list[int], grids) -> torch.Tensor:
    t = torch.tensor(ids)
    if not grids:  # get_rope_index describes vision + text sequences; text alone is 0, 1, 2, ...
        return torch.arange(len(ids)).expand(3, -1)
    pos, _ = bundle.model.model.get_rope_index(
        t[None], mm_token_type_ids=(t == bundle.vocab.image_pad)[None].int(),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return pos[:, 0]


def _segment_by_segment(vocab, ids, grids, cuts):
    bounds = [0] + list(cuts) + [len(ids)]
    parts, start, used = [], 0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = ids[a:b]
        runs = sum(1 for i, t in enumerate(seg) if t == vocab.image_pad and (i == 0 or seg[i - 1] != vocab.image_pad))
        pos, start = mrope_positions(seg, start=start, image_grids=grids[used:used + runs],
                                     image_pad_id=vocab.image_pad)
        used += runs
        assert pos.shape == (3, len(seg)) and pos.dtype == torch.int64
        parts.append(pos)
    return torch.cat(parts, dim=1), start


def test_mrope_positions_segments_chain_to_stock(tiny_bundle):
    bundle = tiny_bundle("region")
    vocab = bundle.vocab

    @settings(max_examples=150, deadline=None)
    @given(layouts(vocab))
    def check(layout):
        ids, grids, cuts = layout
        stock = _stock_positions(bundle, ids, grids)
        ours, nxt = _segment_by_segment(vocab, ids, grids, cuts)
        assert torch.equal(ours, stock), (ids, grids, cuts, ours, stock)
        if ids:  # decode continues at the previous maximum + 1
            assert nxt == int(stock.max()) + 1

    check()


def test_mrope_positions_examples():
    pad = 12
    pos, nxt = mrope_positions([5, pad, pad, pad, pad, pad, pad, 7], start=10, image_grids=[(1, 4, 6)],
                               image_pad_id=pad)
    assert pos.tolist() == [[10, 11, 11, 11, 11, 11, 11, 14],
                            [10, 11, 11, 11, 12, 12, 12, 14],
                            [10, 11, 12, 13, 11, 12, 13, 14]]
    assert nxt == 15
    pos, nxt = mrope_positions(torch.tensor([3, 4, 5]), start=0, image_pad_id=pad)
    assert pos.tolist() == [[0, 1, 2]] * 3 and nxt == 3
    pos, nxt = mrope_positions([], start=4, image_pad_id=pad)
    assert pos.shape == (3, 0) and nxt == 4


def test_mrope_positions_errors():
    pad = 12
    with pytest.raises(ValueError, match="does not match grid"):
        mrope_positions([1, pad, pad, pad, 2], start=0, image_grids=[(1, 4, 4)], image_pad_id=pad)
    with pytest.raises(ValueError, match="only 1 image grids"):
        mrope_positions([pad, 1, pad], start=0, image_grids=[(1, 2, 2)], image_pad_id=pad)
    with pytest.raises(ValueError, match="only 0 image grids"):
        mrope_positions([1, pad], start=0, image_pad_id=pad)
    with pytest.raises(ValueError, match="2 image grids given, 1 image runs"):
        mrope_positions([1, pad, 2], start=0, image_grids=[(1, 2, 2), (1, 2, 2)], image_pad_id=pad)
