"""mrope_positions, computed segment by segment, against transformers' get_rope_index on the whole
sequence (hypothesis-drawn layouts of text, images and cut points), and worked examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vpt_fast.ops import mrope_positions

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
