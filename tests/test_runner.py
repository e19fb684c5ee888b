"""The engine's decoder (Runner over a KVCache) against transformers' own Qwen2-VL forward.

Sequences carry a real image: its features come from the HF vision tower and sit at the
`<|image_pad|>` positions, positions come from stock get_rope_index, and the runner's logits
are compared with `model(input_ids, pixel_values, image_grid_thw, ...)` on the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from vpt_fast.checkpoint import load_vpt_checkpoint
from vpt_fast.engine.cache import KVCache
from vpt_fast.engine.runner import Runner

TOL = 1e-4  # runner vs HF, fp32
SAME = 1e-5  # runner vs runner (batched vs alone, rolled back vs fresh)


@dataclass
class Seq:
    ids: torch.Tensor  # (T,)
    pixel_values: torch.Tensor
    grid: torch.Tensor  # (1, 3)
    embeds: torch.Tensor  # (T, H): token embeddings, image features at the pads
    positions: torch.Tensor  # (3, T)


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


@torch.no_grad()
def make_seq(bundle, seed: int, size=(60, 80), before: int = 3, after: int = 5) -> Seq:
    """`<|im_start|> text <|vision_start|> pads <|vision_end|> text` with a random image."""
    vocab, model = bundle.vocab, bundle.model
    dtype = model.dtype
    pixel_values, grid = bundle.processor.qwen_inputs([_image(seed, *size)])
    pads = int(grid.prod()) // 4
    gen = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(44, 80, (n,), generator=gen).tolist()  # noqa: E731
    ids = torch.tensor([vocab.im_start] + text(before) + [vocab.vision_start] + [vocab.image_pad] * pads
                       + [vocab.vision_end] + text(after))
    feats = model.model.visual(pixel_values.to(dtype), grid_thw=grid).pooler_output
    embeds = model.model.language_model.embed_tokens(ids).clone()
    embeds[ids == vocab.image_pad] = feats.to(embeds.dtype)
    positions, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=_types(bundle, ids),
                                              image_grid_thw=grid, attention_mask=torch.ones_like(ids)[None])
    return Seq(ids, pixel_values, grid, embeds, positions[:, 0])


def _types(bundle, ids: torch.Tensor) -> torch.Tensor:
    return (ids == bundle.vocab.image_pad)[None].int()


@torch.no_grad()
def extend(bundle, seq: Seq, tokens: list[int]) -> Seq:
    """`seq` followed by text tokens (as a decode step would feed them)."""
    ids = torch.cat([seq.ids, torch.tensor(tokens)])
    embeds = torch.cat([seq.embeds, bundle.model.model.language_model.embed_tokens(torch.tensor(tokens))])
    positions, _ = bundle.model.model.get_rope_index(ids[None], mm_token_type_ids=_types(bundle, ids),
                                                     image_grid_thw=seq.grid,
                                                     attention_mask=torch.ones_like(ids)[None])
    return Seq(ids, seq.pixel_values, seq.grid, embeds, positions[:, 0])


@torch.no_grad()
def hf_logits(bundle, seq: Seq) -> torch.Tensor:
    model = bundle.model
    out = model(input_ids=seq.ids[None], pixel_values=seq.pixel_values.to(model.dtype), image_grid_thw=seq.grid,
                mm_token_type_ids=_types(bundle, seq.ids))
    return out.logits[0].float()


def new_cache(runner: Runner, slots: int = 4, max_len: int = 64, dtype=None) -> KVCache:
    cfg = runner.config
    return KVCache(cfg.num_hidden_layers, slots, max_len, runner.num_kv_heads, runner.head_dim,
                   dtype or runner.dtype, runner.device)


@torch.no_grad()
def step(runner: Runner, cache: KVCache, slot: int, seq: Seq, a: int, b: int) -> torch.Tensor:
    """Feed tokens a..b of `seq` to `slot`; their logits (b - a, V)."""
    hidden = runner.forward(seq.embeds[None, a:b], seq.positions[:, None, a:b], cache, torch.tensor([slot]),
                            torch.tensor([b - a]))
    return runner.logits(hidden)[0]


@torch.no_grad()
def batched(runner: Runner, cache: KVCache, slots: list[int], rows: list[tuple[Seq, int, int]]) -> list[torch.Tensor]:
    """One ragged call: row i feeds tokens a..b of its sequence to slots[i] (right-padded)."""
    width = max(b - a for _, a, b in rows)
    hidden_size = rows[0][0].embeds.shape[-1]
    embeds = torch.zeros(len(rows), width, hidden_size, dtype=rows[0][0].embeds.dtype)
    positions = torch.zeros(3, len(rows), width, dtype=torch.long)
    for i, (seq, a, b) in enumerate(rows):
        embeds[i, : b - a] = seq.embeds[a:b]
        positions[:, i, : b - a] = seq.positions[:, a:b]
    new_lens = torch.tensor([b - a for _, a, b in rows])
    logits = runner.logits(runner.forward(embeds, positions, cache, torch.tensor(slots), new_lens))
    return [logits[i, : b - a] for i, (_, a, b) in enumerate(rows)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def poison_beyond_lengths(cache: KVCache) -> None:
    for slot in range(cache.slots):
        n = cache.length(slot)
        cache.k[:, slot, n:] = float("nan")
        cache.v[:, slot, n:] = float("nan")


# ----------------------------------------------------------------------------- against HF


@pytest.mark.parametrize("variant", ["region", "clip"])
def test_prefill_chunks_and_decode_match_hf(tiny_bundle, variant):
    bundle = tiny_bundle(variant)
    runner = Runner(bundle.model)
    seq = make_seq(bundle, seed=1)
    T = len(seq.ids)
    ref = hf_logits(bundle, seq)

    cache = new_cache(runner)
    whole = step(runner, cache, 1, seq, 0, T)
    assert cache.length(1) == T and cache.length(0) == 0
    assert max_diff(whole, ref) <= TOL, f"one-call prefill: max |diff| {max_diff(whole, ref):.3g}"

    # three chunks, the cuts falling inside the image run and the text
    cuts = [0, 6, 11, T]
    cache = new_cache(runner)
    chunks = torch.cat([step(runner, cache, 2, seq, a, b) for a, b in zip(cuts[:-1], cuts[1:])])
    assert cache.length(2) == T
    assert max_diff(chunks, ref) <= TOL, f"chunked prefill: max |diff| {max_diff(chunks, ref):.3g}"

    # prefill the prompt, then one token at a time
    cache = new_cache(runner)
    prompt = T - 6
    out = [step(runner, cache, 0, seq, 0, prompt)] + [step(runner, cache, 0, seq, t, t + 1) for t in range(prompt, T)]
    decoded = torch.cat(out)
    assert max_diff(decoded, ref) <= TOL, f"prefill + decode: max |diff| {max_diff(decoded, ref):.3g}"


def test_ragged_batch_matches_each_sequence_alone_and_hf(tiny_bundle):
    bundle = tiny_bundle("region")
    runner = Runner(bundle.model)
    decode = [[50, 51, 52, 53], [60, 61, 62, 63], [70, 71, 72, 73]]
    prompts = [make_seq(bundle, seed=2, size=(56, 56), before=2, after=1),
               make_seq(bundle, seed=3, size=(84, 112), before=4, after=3),
               make_seq(bundle, seed=4, size=(60, 80), before=1, after=6)]
    seqs = [extend(bundle, p, d) for p, d in zip(prompts, decode)]
    lens = [len(p.ids) for p in prompts]
    assert len(set(lens)) == 3
    slots = [2, 0, 1]

    cache = new_cache(runner, slots=4)
    out = [[x] for x in batched(runner, cache, slots, [(s, 0, n) for s, n in zip(seqs, lens)])]
    assert [cache.length(s) for s in slots] == lens and cache.length(3) == 0
    # decode together: each row at its own length and position; in step 2 row 1 sits out
    done = list(lens)
    for k in range(len(decode[0])):
        rows = [(s, d, d + 1) for s, d in zip(seqs, done)]
        if k == 2:
            rows[1] = (seqs[1], done[1], done[1])
        for i, x in enumerate(batched(runner, cache, slots, rows)):
            out[i].append(x)
        done = [d + (b - a) for d, (_, a, b) in zip(done, rows)]
    assert [cache.length(s) for s in slots] == done
    # row 1 finishes its last token alone
    out[1].append(step(runner, cache, slots[1], seqs[1], done[1], done[1] + 1))

    for i, seq in enumerate(seqs):
        got = torch.cat(out[i])
        assert got.shape[0] == len(seq.ids)
        alone_cache = new_cache(runner, slots=1)
        alone = torch.cat([step(runner, alone_cache, 0, seq, 0, lens[i])]
                          + [step(runner, alone_cache, 0, seq, t, t + 1) for t in range(lens[i], len(seq.ids))])
        assert max_diff(got, alone) <= SAME, f"row {i} batched vs alone: max |diff| {max_diff(got, alone):.3g}"
        ref = hf_logits(bundle, seq)
        assert max_diff(got, ref) <= TOL, f"row {i} vs HF: max |diff| {max_diff(got, ref):.3g}"


def test_rollback_then_append_equals_fresh_prefill(tiny_bundle):
    bundle = tiny_bundle("region")
    runner = Runner(bundle.model)
    a = make_seq(bundle, seed=5)
    ab = extend(bundle, a, [44, 45, 46, 47, 48])
    ac = extend(bundle, a, [70, 71, 72])
    other = extend(bundle, make_seq(bundle, seed=6, size=(84, 112)), [60, 61])  # longer than A + C
    n = len(a.ids)

    fresh_cache = new_cache(runner, slots=1)
    fresh = step(runner, fresh_cache, 0, ac, 0, len(ac.ids))

    cache = new_cache(runner, slots=3)
    step(runner, cache, 0, ab, 0, len(ab.ids))
    step(runner, cache, 2, other, 0, len(other.ids) - 1)
    cache.rollback(0, n)
    assert cache.length(0) == n
    # whatever lies past a slot's length (rolled-back keys, unused positions) is never read
    poison_beyond_lengths(cache)
    appended = step(runner, cache, 0, ac, n, len(ac.ids))
    assert bool(appended.isfinite().all())
    assert max_diff(appended, fresh[n:]) <= SAME, f"rollback + append: max |diff| {max_diff(appended, fresh[n:]):.3g}"

    # the same in a ragged batch next to a longer sequence, both slots poisoned past their lengths
    cache.rollback(0, n)
    poison_beyond_lengths(cache)
    rows = batched(runner, cache, [0, 2], [(ac, n, len(ac.ids)), (other, len(other.ids) - 1, len(other.ids))])
    assert all(bool(r.isfinite().all()) for r in rows)
    err = max_diff(rows[0], fresh[n:])
    assert err <= SAME, f"batched after rollback: max |diff| {err:.3g}"
    ref_other = hf_logits(bundle, other)[-1:]
    assert max_diff(rows[1], ref_other) <= TOL, f"neighbour row vs HF: {max_diff(rows[1], ref_other):.3g}"
    ref = hf_logits(bundle, ac)[n:]
    assert max_diff(appended, ref) <= TOL, f"rollback + append vs HF: max |diff| {max_diff(appended, ref):.3g}"


# ----------------------------------------------------------------------------- errors


def test_kv_cache_rollback_bounds(tiny_bundle):
    runner = Runner(tiny_bundle("region").model)
    cache = new_cache(runner, slots=2, max_len=16)
    with pytest.raises(ValueError, match="a cache needs at least one slot"):
        KVCache(1, 0, 16, 2, 16, torch.float32, "cpu")
    seq = make_seq(tiny_bundle("region"), seed=7, size=(56, 56), before=1, after=1)
    step(runner, cache, 1, seq, 0, 5)
    with pytest.raises(ValueError, match=r"rollback of slot 1 to 6: must be within \[0, 5\]"):
        cache.rollback(1, 6)
    with pytest.raises(ValueError, match=r"must be within \[0, 5\]"):
        cache.rollback(1, -1)
    with pytest.raises(ValueError, match=r"must be within \[0, 0\]"):
        cache.rollback(0, 1)
    assert cache.lengths.tolist() == [0, 5]
    cache.rollback(1, 5)
    cache.rollback(1, 0)
    assert cache.lengths.tolist() == [0, 0]


def test_runner_overflow_changes_nothing(tiny_bundle):
    bundle = tiny_bundle("region")
    runner = Runner(bundle.model)
    seq = make_seq(bundle, seed=8, size=(56, 56), before=2, after=4)  # 13 tokens
    cache = new_cache(runner, slots=2, max_len=12)
    step(runner, cache, 0, seq, 0, 9)
    step(runner, cache, 1, seq, 0, 3)
    lengths, k, v = cache.lengths.clone(), cache.k.clone(), cache.v.clone()
    with pytest.raises(ValueError, match="overflow"):
        step(runner, cache, 0, seq, 9, 13)
    # one row over in a batch: no row is written
    with pytest.raises(ValueError, match="overflow"):
        batched(runner, cache, [1, 0], [(seq, 3, 6), (seq, 9, 13)])
    assert torch.equal(cache.lengths, lengths)
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
    # exactly full is fine
    step(runner, cache, 0, seq, 9, 12)
    assert cache.lengths.tolist() == [12, 3]


# ----------------------------------------------------------------------------- bf16


def test_bf16_runner_error_is_within_hf_bf16_error(tiny_bundle, tiny_ckpt):
    b32 = tiny_bundle("region")
    b16 = load_vpt_checkpoint(tiny_ckpt("region"), dtype=torch.bfloat16)
    assert b16.model.dtype == torch.bfloat16
    seq32 = make_seq(b32, seed=9)
    seq16 = make_seq(b16, seed=9)
    assert torch.equal(seq16.ids, seq32.ids) and torch.equal(seq16.positions, seq32.positions)
    ref = hf_logits(b32, seq32)
    hf16 = hf_logits(b16, seq16)

    runner = Runner(b16.model)
    assert runner.dtype == torch.bfloat16
    cache = new_cache(runner)
    assert cache.k.dtype == torch.bfloat16
    T = len(seq16.ids)
    prompt = T - 4
    ours = torch.cat([step(runner, cache, 3, seq16, 0, prompt)]
                     + [step(runner, cache, 3, seq16, t, t + 1) for t in range(prompt, T)])
    err_hf, err_ours = max_diff(hf16, ref), max_diff(ours, ref)
    assert err_ours <= 2 * err_hf + 1e-3, f"bf16 runner error {err_ours:.3g} vs HF bf16 error {err_hf:.3g}"
