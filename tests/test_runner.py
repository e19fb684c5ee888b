"""The engine's decoder (Runner over a paged KV cache) against transformers' own Qwen2-VL forward.

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
from vpt_fast.engine.cache import OutOfBlocks, PagedKVCache
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


class Paged:
    """A paged cache with hand-kept block tables: sequence name -> (blocks, length)."""

    def __init__(self, runner: Runner, num_blocks: int = 40, block_size: int = 4, dtype=None, seed: int = 0):
        cfg = runner.config
        self.runner = runner
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, runner.num_kv_heads, runner.head_dim,
                                  dtype or runner.dtype, runner.device)
        order = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
        self.free = order.tolist()  # blocks handed out in a scrambled order: tables are never contiguous
        self.seqs: dict[str, tuple[list[int], int]] = {}

    def grow(self, name: str, new: int) -> tuple[list[int], int]:
        blocks, length = self.seqs.get(name, ([], 0))
        while len(blocks) * self.cache.block_size < length + new:
            blocks.append(self.free.pop())
        self.seqs[name] = (blocks, length + new)
        return blocks, length

    def rollback(self, name: str, length: int) -> None:
        blocks, old = self.seqs[name]
        assert 0 <= length <= old
        self.seqs[name] = (blocks, length)

    def poison(self) -> None:
        """NaN in every cache entry past each sequence's length, and in every unused block."""
        bs = self.cache.block_size
        used = set()
        for blocks, length in self.seqs.values():
            for i, blk in enumerate(blocks):
                used.add(blk)
                start = max(0, length - i * bs)
                self.cache.k[:, blk, start:] = float("nan")
                self.cache.v[:, blk, start:] = float("nan")
        for blk in range(1, self.cache.num_blocks):
            if blk not in used:
                self.cache.k[:, blk] = float("nan")
                self.cache.v[:, blk] = float("nan")


@torch.no_grad()
def batched(paged: Paged, rows: list[tuple[str, Seq, int, int]]) -> list[torch.Tensor]:
    """One ragged prefill call: row (name, seq, a, b) feeds tokens a..b of `seq` to sequence `name`;
    their logits (b - a, V) each."""
    runner, cache = paged.runner, paged.cache
    embeds, positions, slots, tables, lens, counts = [], [], [], [], [], []
    for name, seq, a, b in rows:
        blocks, length = paged.grow(name, b - a)
        assert length == a, f"{name} holds {length} tokens, the row starts at {a}"
        embeds.append(seq.embeds[a:b])
        positions.append(seq.positions[:, a:b])
        slots += cache.slots(blocks, a, b)
        tables.append(list(blocks))
        lens.append(b)
        counts.append(b - a)
    width = max(len(t) for t in tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    cu = torch.tensor([0] + counts).cumsum(0)
    hidden = runner.prefill(torch.cat(embeds), torch.cat(positions, dim=1), cache, torch.tensor(slots), tables,
                            torch.tensor(lens), cu, max(counts))
    logits = runner.logits(hidden)
    return [logits[cu[i] : cu[i + 1]] for i in range(len(rows))]


def step(paged: Paged, name: str, seq: Seq, a: int, b: int) -> torch.Tensor:
    return batched(paged, [(name, seq, a, b)])[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------- against HF


@pytest.mark.parametrize("variant", ["region", "clip"])
def test_prefill_chunks_and_decode_match_hf(tiny_bundle, variant):
    bundle = tiny_bundle(variant)
    runner = Runner(bundle.model)
    seq = make_seq(bundle, seed=1)
    T = len(seq.ids)
    ref = hf_logits(bundle, seq)

    whole = step(Paged(runner), "a", seq, 0, T)
    assert max_diff(whole, ref) <= TOL, f"one-call prefill: max |diff| {max_diff(whole, ref):.3g}"

    # three chunks, the cuts falling inside the image run and the text
    cuts = [0, 6, 11, T]
    paged = Paged(runner, seed=1)
    chunks = torch.cat([step(paged, "a", seq, a, b) for a, b in zip(cuts[:-1], cuts[1:])])
    assert max_diff(chunks, ref) <= TOL, f"chunked prefill: max |diff| {max_diff(chunks, ref):.3g}"

    # prefill the prompt, then one token at a time through the decode path
    paged = Paged(runner, seed=2)
    prompt = T - 6
    out = [step(paged, "a", seq, 0, prompt)]
    for t in range(prompt, T):
        blocks, length = paged.grow("a", 1)
        hidden = runner.decode(seq.embeds[t : t + 1], seq.positions[:, t : t + 1], paged.cache,
                               torch.tensor(paged.cache.slots(blocks, t, t + 1)), torch.tensor([blocks]), torch.tensor([t + 1]))
        out.append(runner.logits(hidden))
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
    names = ["x", "y", "z"]

    paged = Paged(runner, num_blocks=60)
    out = [[x] for x in batched(paged, [(n, s, 0, k) for n, s, k in zip(names, seqs, lens)])]
    paged.poison()
    # feed the rest together: each row at its own length and position; in step 2 row 1 sits out
    done = list(lens)
    for k in range(len(decode[0])):
        rows = [(n, s, d, d + 1) for n, s, d in zip(names, seqs, done)]
        if k == 2:
            rows.pop(1)
        for (n, _, _, _), x in zip(rows, batched(paged, rows)):
            out[names.index(n)].append(x)
        for n, _, a, b in rows:
            done[names.index(n)] = b
    out[1].append(step(paged, "y", seqs[1], done[1], done[1] + 1))

    for i, seq in enumerate(seqs):
        got = torch.cat(out[i])
        assert got.shape[0] == len(seq.ids) and bool(got.isfinite().all())
        alone_paged = Paged(runner, seed=5)
        alone = torch.cat([step(alone_paged, "a", seq, 0, lens[i])]
                          + [step(alone_paged, "a", seq, t, t + 1) for t in range(lens[i], len(seq.ids))])
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

    fresh = step(Paged(runner), "a", ac, 0, len(ac.ids))

    paged = Paged(runner, num_blocks=80, seed=3)
    step(paged, "a", ab, 0, len(ab.ids))
    step(paged, "o", other, 0, len(other.ids) - 1)
    paged.rollback("a", n)
    # whatever lies past a length (rolled-back keys, unused blocks) is never read
    paged.poison()
    appended = step(paged, "a", ac, n, len(ac.ids))
    assert bool(appended.isfinite().all())
    assert max_diff(appended, fresh[n:]) <= SAME, f"rollback + append: max |diff| {max_diff(appended, fresh[n:]):.3g}"

    # the same in a ragged batch next to a longer sequence, everything stale poisoned
    paged.rollback("a", n)
    paged.poison()
    rows = batched(paged, [("a", ac, n, len(ac.ids)), ("o", other, len(other.ids) - 1, len(other.ids))])
    assert all(bool(r.isfinite().all()) for r in rows)
    err = max_diff(rows[0], fresh[n:])
    assert err <= SAME, f"batched after rollback: max |diff| {err:.3g}"
    ref_other = hf_logits(bundle, other)[-1:]
    assert max_diff(rows[1], ref_other) <= TOL, f"neighbour row vs HF: {max_diff(rows[1], ref_other):.3g}"
    ref = hf_logits(bundle, ac)[n:]
    assert max_diff(appended, ref) <= TOL, f"rollback + append vs HF: max |diff| {max_diff(appended, ref):.3g}"


# ----------------------------------------------------------------------------- the cache


def test_paged_cache_blocks(tiny_bundle):
    runner = Runner(tiny_bundle("region").model)
    cache = PagedKVCache(2, 6, 4, runner.num_kv_heads, runner.head_dim, torch.float32, "cpu")
    assert cache.usable_blocks == 5 and cache.capacity == 20 and cache.num_free == 5
    assert cache.blocks_for(0) == 0 and cache.blocks_for(4) == 1 and cache.blocks_for(5) == 2
    a = cache.allocate(2)
    b = cache.allocate(3)
    assert 0 not in a + b and len(set(a + b)) == 5 and cache.num_free == 0 and cache.num_used == 5
    with pytest.raises(OutOfBlocks, match="1 blocks asked for, 0 free"):
        cache.allocate(1)
    assert cache.slots(a, 2, 6) == [a[0] * 4 + 2, a[0] * 4 + 3, a[1] * 4, a[1] * 4 + 1]
    cache.release(b)
    assert cache.allocate(3) == b  # the most recently freed blocks come back first
    cache.reset()
    assert cache.num_free == 5
    with pytest.raises(ValueError, match="at least 2 blocks"):
        PagedKVCache(1, 1, 4, 1, 8, torch.float32, "cpu")


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
    paged = Paged(runner)
    assert paged.cache.k.dtype == torch.bfloat16
    T = len(seq16.ids)
    prompt = T - 4
    ours = torch.cat([step(paged, "a", seq16, 0, prompt)] + [step(paged, "a", seq16, t, t + 1) for t in range(prompt, T)])
    err_hf, err_ours = max_diff(hf16, ref), max_diff(ours, ref)
    assert err_ours <= 2 * err_hf + 1e-3, f"bf16 runner error {err_ours:.3g} vs HF bf16 error {err_hf:.3g}"
