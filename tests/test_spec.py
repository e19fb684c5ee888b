"""Tests of vpt_fast.spec: vocabulary, round-1 parsing (docs/vpt.md §7) and region boxes."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpt_fast import spec
from vpt_fast.spec import (
    ActionIds,
    Malformed,
    NoPerception,
    ReencodeRequest,
    RegionBlock,
    RegionRequest,
    SeveralKinds,
    Vocab,
    block_box,
    parse_perception,
    region_box,
)

# Fake ids: every token string gets an id from 100 up; plain text tokens are 1..99.
ALL_TOKENS = spec.QWEN_SPECIAL_TOKENS + spec.VPT_TOKENS
TOKEN_ID = {t: 100 + i for i, t in enumerate(ALL_TOKENS)}
ID_TOKEN = {i: t for t, i in TOKEN_ID.items()}
VOCAB = Vocab.from_token_to_id(TOKEN_ID.get)
TEXT_A, TEXT_B = 7, 8


def ids(*tokens):
    """Token strings -> fake ids; ints pass through as text tokens."""
    return [t if isinstance(t, int) else TOKEN_ID[t] for t in tokens]


def region(*cells):
    """A well-formed block from cell names such as "x3", "y5"."""
    inner = [f"<|{c[0]}_{c[1:]}|>" for c in cells]
    return [spec.REGION_START, *inner, spec.REGION_END]


def parse(*tokens):
    return parse_perception(ids(*tokens), VOCAB)


# --- Vocab -----------------------------------------------------------------


def test_vocab_from_full_table():
    assert VOCAB.pad == TOKEN_ID["<|endoftext|>"]
    assert VOCAB.im_end == TOKEN_ID["<|im_end|>"]
    assert VOCAB.image_pad == TOKEN_ID["<|image_pad|>"]
    assert VOCAB.region_start == TOKEN_ID["<|region_token_start|>"]
    assert VOCAB.x == tuple(TOKEN_ID[f"<|x_{i}|>"] for i in range(8))
    assert VOCAB.y == tuple(TOKEN_ID[f"<|y_{i}|>"] for i in range(8))
    assert set(VOCAB.actions) == {"clip", "dino", "sam"}
    assert VOCAB.actions["dino"] == ActionIds(
        TOKEN_ID["<|detection_action_start|>"],
        TOKEN_ID["<|detection_action|>"],
        TOKEN_ID["<|detection_action_end|>"],
        TOKEN_ID["<|detection_image_pad|>"],
    )
    assert VOCAB.kind_of_start(TOKEN_ID["<|seg_action_start|>"]) == "sam"
    assert VOCAB.kind_of_start(TOKEN_ID["<|seg_action|>"]) is None
    assert VOCAB.is_region_token(TOKEN_ID["<|y_7|>"])
    assert VOCAB.is_region_token(TOKEN_ID["<|region_token_end|>"])
    assert not VOCAB.is_region_token(TOKEN_ID["<|clip_action|>"])
    assert hash(VOCAB) == hash(Vocab.from_token_to_id(TOKEN_ID.get))


def test_vocab_token_lists():
    assert len(spec.VPT_TOKENS) == 18 + 12 == len(set(spec.VPT_TOKENS))
    assert spec.QWEN_SPECIAL_TOKENS[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert len(spec.QWEN_SPECIAL_TOKENS) == 14


def test_vocab_plain_qwen_has_no_region_or_actions():
    table = {t: i for i, t in enumerate(spec.QWEN_SPECIAL_TOKENS)}
    vocab = Vocab.from_token_to_id(table.get)
    assert vocab.region_start is None and vocab.x is None and vocab.y is None
    assert not vocab.has_region and dict(vocab.actions) == {}
    # Ids that would be region tokens elsewhere are just text here.
    assert isinstance(parse_perception([0, 1, 2], vocab), NoPerception)


def test_vocab_partial_kind_and_region_are_absent():
    table = dict(TOKEN_ID)
    del table["<|clip_image_pad|>"]
    del table["<|y_3|>"]
    vocab = Vocab.from_token_to_id(table.get)
    assert set(vocab.actions) == {"dino", "sam"}
    assert not vocab.has_region
    assert isinstance(
        parse_perception(ids(*region("x1", "y1"), "<|clip_action_start|>"), vocab), NoPerception
    )


def test_vocab_missing_qwen_tokens():
    table = dict(TOKEN_ID)
    del table["<|im_end|>"]
    del table["<|vision_end|>"]
    with pytest.raises(ValueError, match=r"im_end.*vision_end"):
        Vocab.from_token_to_id(table.get)


def test_vocab_from_tokenizer_uses_get_vocab():
    class FakeTokenizer:
        def get_vocab(self):
            return {t: i for t, i in TOKEN_ID.items() if "seg" not in t}

    vocab = Vocab.from_tokenizer(FakeTokenizer())
    assert set(vocab.actions) == {"clip", "dino"}
    assert vocab.region_end == TOKEN_ID["<|region_token_end|>"]


# --- parse_perception: the rows of docs/vpt.md §7 -------------------------------


def test_one_region_block():
    r = parse(*region("x2", "y5", "x4", "y6"), "<|im_end|>")
    assert r == RegionRequest((RegionBlock((2, 4), (5, 6), (0, 6)),))
    assert r.kind == "region"
    assert r.blocks[0].cells == (2, 5, 4, 6)


def test_three_region_blocks():
    toks = [*region("x0", "y0"), TEXT_A, *region("x7", "y1", "y2"), *region("y3", "x5", "x6")]
    r = parse(*toks)
    assert isinstance(r, RegionRequest)
    assert [b.cells for b in r.blocks] == [(0, 0, 0, 0), (7, 1, 7, 2), (5, 3, 6, 3)]
    assert [b.span for b in r.blocks] == [(0, 4), (5, 10), (10, 15)]


def test_repeated_and_unordered_cells():
    r = parse(*region("x5", "y6", "x1", "x5", "y2", "y6", "x3"))
    assert r.blocks[0].x_cells == (1, 3, 5)
    assert r.blocks[0].y_cells == (2, 6)
    assert r.blocks[0].cells == (1, 2, 5, 6)


def test_text_around_block():
    r = parse(TEXT_A, TEXT_B, *region("x3", "y4"), TEXT_B, TEXT_A, "<|im_end|>")
    assert r == RegionRequest((RegionBlock((3,), (4,), (2, 6)),))


@pytest.mark.parametrize(
    "kind, start, action, end",
    [
        ("clip", "<|clip_action_start|>", "<|clip_action|>", "<|clip_action_end|>"),
        ("dino", "<|detection_action_start|>", "<|detection_action|>", "<|detection_action_end|>"),
        ("sam", "<|seg_action_start|>", "<|seg_action|>", "<|seg_action_end|>"),
    ],
)
def test_reencode_kinds(kind, start, action, end):
    assert parse(start, action, end, "<|im_end|>") == ReencodeRequest(kind, 0)
    assert parse(start) == ReencodeRequest(kind, 0)
    r = parse(TEXT_A, TEXT_B, start, TEXT_A, start, action)
    assert r == ReencodeRequest(kind, 2)
    assert r.kind == kind


def test_reencode_with_broken_region_block_is_reencode():
    r = parse(spec.REGION_START, "<|x_1|>", "<|clip_action_start|>", "<|clip_action|>")
    assert r == ReencodeRequest("clip", 2)


@pytest.mark.parametrize(
    "tokens, kinds",
    [
        ([*region("x1", "y1"), "<|clip_action_start|>"], ("region", "clip")),
        (["<|detection_action_start|>", "<|clip_action_start|>"], ("clip", "dino")),
        (["<|seg_action_start|>", *region("x1", "y2"), "<|clip_action_start|>"], ("region", "clip", "sam")),
    ],
)
def test_several_kinds(tokens, kinds):
    r = parse(*tokens)
    assert r == SeveralKinds(kinds)
    assert r.kind == "several"


def test_region_block_with_only_x_in_several_counts_as_region():
    r = parse(*region("x1", "x2"), "<|seg_action_start|>")
    assert r == SeveralKinds(("region", "sam"))


def test_nothing():
    r = parse(TEXT_A, TEXT_B, "<|im_end|>")
    assert r == NoPerception() and r.kind == "none"


def test_empty_input():
    assert parse_perception([], VOCAB) == NoPerception()


def test_unterminated_block_ignored():
    assert parse(spec.REGION_START, "<|x_1|>", "<|y_2|>") == NoPerception()
    assert parse(spec.REGION_START, "<|x_1|>", "<|y_2|>", "<|im_end|>") == NoPerception()


def test_interrupted_block_ignored():
    r = parse(spec.REGION_START, "<|x_1|>", TEXT_A, "<|y_2|>", spec.REGION_END)
    assert r == NoPerception()


def test_restart_inside_block():
    # The first start is interrupted by a second start; the second forms a block.
    r = parse(spec.REGION_START, "<|x_1|>", *region("x3", "y3"))
    assert r == RegionRequest((RegionBlock((3,), (3,), (2, 6)),))


def test_empty_block_is_not_a_block():
    assert parse(spec.REGION_START, spec.REGION_END) == NoPerception()
    r = parse(spec.REGION_START, spec.REGION_END, *region("x0", "y7"))
    assert r == RegionRequest((RegionBlock((0,), (7,), (2, 6)),))


@pytest.mark.parametrize("cells, missing", [(("x1", "x4"), "y"), (("y1",), "x")])
def test_block_lacking_an_axis_is_malformed(cells, missing):
    r = parse(*region("x0", "y0"), *region(*cells))
    assert isinstance(r, Malformed) and r.kind == "malformed"
    assert "block 1" in r.reason and f"no {missing}" in r.reason
    assert isinstance(r.detail, RegionBlock) and r.detail.span[0] == 4
    with pytest.raises(ValueError):
        r.detail.cells


def test_closing_im_end_optional():
    body = [TEXT_A, *region("x2", "y3")]
    assert parse(*body) == parse(*body, "<|im_end|>")
    assert parse(TEXT_A) == parse(TEXT_A, "<|im_end|>") == NoPerception()


def test_unknown_and_negative_ids():
    r = parse_perception([-5, 10**12, *ids(*region("x1", "y1")), -1], VOCAB)
    assert r == RegionRequest((RegionBlock((1,), (1,), (2, 6)),))


def test_non_int_elements_rejected():
    with pytest.raises(TypeError, match="index 1 is float"):
        parse_perception([1, 2.0], VOCAB)
    with pytest.raises(TypeError, match="index 0 is str"):
        parse_perception(["<|x_1|>"], VOCAB)
    with pytest.raises(TypeError, match="bool"):
        parse_perception([True], VOCAB)


# --- region_box --------------------------------------------------------------


def test_region_box_published_golden():
    # widened to (1, 4, 5, 7); 333/8 = 41.625, 517/8 = 64.625
    assert region_box((2, 5, 4, 6), 333, 517) == (41, 258, 249, 517)
    block = parse(*region("x2", "y5", "x4", "y6")).blocks[0]
    assert block_box(block, 333, 517) == (41, 258, 249, 517)


@pytest.mark.parametrize(
    "cells, size, box",
    [
        ((0, 0, 0, 0), (800, 600), (0, 0, 200, 150)),
        ((7, 7, 7, 7), (800, 600), (600, 450, 800, 600)),
        ((0, 0, 7, 7), (800, 600), (0, 0, 800, 600)),
        ((3, 3, 3, 3), (100, 100), (25, 25, 62, 62)),  # 2*12.5, 5*12.5=62.5
        ((0, 7, 7, 7), (37, 5), (0, 3, 37, 5)),  # y: 6*0.625=3.75, 8*0.625=5
        ((3, 0, 3, 0), (37, 5), (9, 0, 23, 1)),  # x: 2*4.625, 5*4.625=23.125; y: 0, 2*0.625=1.25
    ],
)
def test_region_box_hand_computed(cells, size, box):
    assert region_box(cells, *size) == box


@pytest.mark.parametrize(
    "cells, size, box",
    [
        ((0, 0, 0, 0), (1, 1), (0, 0, 1, 1)),  # int(2/8)=0: grown to 1 px
        ((7, 7, 7, 7), (1, 1), (0, 0, 1, 1)),  # int(6/8)=0, int(8/8)=1: already non-empty
        ((4, 4, 4, 4), (1, 1), (0, 0, 1, 1)),
        ((0, 0, 0, 0), (3, 2), (0, 0, 1, 1)),  # int(2*0.375)=0 grown; int(2*0.25)=0 grown
        ((4, 4, 4, 4), (3, 2), (1, 0, 2, 1)),  # x: int(3*0.375)=1, int(6*0.375)=2; y: 0,int(1.5)=1
    ],
)
def test_region_box_tiny_images(cells, size, box):
    assert region_box(cells, *size) == box


@pytest.mark.parametrize(
    "cells, match",
    [
        ((0, 0, 8, 1), r"\(0, 0, 8, 1\)"),
        ((-1, 0, 1, 1), r"\(-1, 0, 1, 1\)"),
        ((3, 0, 2, 1), r"\(3, 0, 2, 1\)"),
        ((0, 4, 1, 3), r"\(0, 4, 1, 3\)"),
        ((0, 0, 1.0, 1), r"\(0, 0, 1.0, 1\)"),
        ((0, 0, 1), r"\(0, 0, 1\)"),
    ],
)
def test_region_box_invalid_cells(cells, match):
    with pytest.raises(ValueError, match=match):
        region_box(cells, 100, 100)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10.0, 10), (10, True)])
def test_region_box_invalid_size(size):
    with pytest.raises(ValueError, match="width and height"):
        region_box((0, 0, 1, 1), *size)


# --- fuzzing -------------------------------------------------------------------

REGION_IDS = [TOKEN_ID[t] for t in spec.REGION_TOKENS]
START_IDS = [TOKEN_ID[spec.ACTION_TOKENS[k].start] for k in spec.REENCODE_KINDS]
OTHER_IDS = [-3, 0, 1, TEXT_A, 10**9]
CELL_IDS = [TOKEN_ID[t] for t in spec.X_TOKENS + spec.Y_TOKENS]
single_ids = st.one_of(
    st.sampled_from(REGION_IDS),
    st.sampled_from(sorted(ID_TOKEN)),
    st.sampled_from(OTHER_IDS),
    st.sampled_from(START_IDS),
).map(lambda i: [i])
# Well-formed blocks, often x-only or y-only, so every parse branch is reached.
blocks = st.lists(
    st.sampled_from(CELL_IDS[:8]) | st.sampled_from(CELL_IDS[8:]) | st.sampled_from(CELL_IDS),
    min_size=1, max_size=6,
).map(lambda cells: [VOCAB.region_start, *cells, VOCAB.region_end])
id_lists = st.lists(st.one_of(single_ids, single_ids, blocks), max_size=12).map(
    lambda chunks: [i for chunk in chunks for i in chunk]
)
RESULT_TYPES = (RegionRequest, ReencodeRequest, SeveralKinds, NoPerception, Malformed)
BLOCK_RE = re.compile(r"<\|region_token_start\|>((?:<\|[xy]_[0-7]\|>)+)<\|region_token_end\|>")


def render(seq):
    return "".join(ID_TOKEN.get(i, f"[{i}]") for i in seq)


def expected_kinds(text):
    present = {
        "region": BLOCK_RE.search(text) is not None,
        "clip": "<|clip_action_start|>" in text,
        "dino": "<|detection_action_start|>" in text,
        "sam": "<|seg_action_start|>" in text,
    }
    return [k for k in ("region", "clip", "dino", "sam") if present[k]]


@settings(max_examples=200, deadline=None)
@given(id_lists, st.integers(1, 5000), st.integers(1, 5000))
def test_fuzz_parse_matches_text_rules(seq, width, height):
    r = parse_perception(seq, VOCAB)
    assert isinstance(r, RESULT_TYPES)
    text = render(seq)
    kinds = expected_kinds(text)
    assert isinstance(r, SeveralKinds) == (len(kinds) > 1)
    if len(kinds) > 1:
        assert r.kinds == tuple(kinds)
    elif not kinds:
        assert isinstance(r, NoPerception)
    elif kinds[0] != "region":
        assert r == ReencodeRequest(kinds[0], seq.index(TOKEN_ID[spec.ACTION_TOKENS[kinds[0]].start]))
    else:
        matches = [m.group(1) for m in BLOCK_RE.finditer(text)]
        xs = [tuple(sorted({int(d) for d in re.findall(r"x_(\d)", m)})) for m in matches]
        ys = [tuple(sorted({int(d) for d in re.findall(r"y_(\d)", m)})) for m in matches]
        if all(xs) and all(ys):
            assert isinstance(r, RegionRequest)
            assert [(b.x_cells, b.y_cells) for b in r.blocks] == list(zip(xs, ys))
            for b in r.blocks:
                start, end = b.span
                assert seq[start] == VOCAB.region_start and seq[end - 1] == VOCAB.region_end
                x0, y0, x1, y1 = block_box(b, width, height)
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        else:
            assert isinstance(r, Malformed)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 7), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7),
    st.integers(1, 5000), st.integers(1, 5000),
)
def test_fuzz_region_box_inside_and_non_empty(a, b, c, d, width, height):
    cells = (min(a, c), min(b, d), max(a, c), max(b, d))
    x0, y0, x1, y1 = region_box(cells, width, height)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    if width >= 4 and height >= 4:
        # Large enough that the published rule applies unchanged.
        gx0, gy0 = max(cells[0] - 1, 0), max(cells[1] - 1, 0)
        gx1, gy1 = min(cells[2] + 1, 7), min(cells[3] + 1, 7)
        assert (x0, y0, x1, y1) == (
            int(gx0 * width / 8), int(gy0 * height / 8),
            int((gx1 + 1) * width / 8), int((gy1 + 1) * height / 8),
        )
