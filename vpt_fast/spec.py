"""The VPT token contract: vocabulary, round-1 output parsing and region boxes.

Pure Python (no torch), so it can be imported and tested anywhere. Token ids
always come from a tokenizer (``Vocab.from_tokenizer``); none are hard-coded.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Union

# --- Token strings ---------------------------------------------------------

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

GRID = 8

REGION_START = "<|region_token_start|>"
REGION_END = "<|region_token_end|>"
X_TOKENS = tuple(f"<|x_{i}|>" for i in range(GRID))
Y_TOKENS = tuple(f"<|y_{i}|>" for i in range(GRID))
REGION_TOKENS = (REGION_START, REGION_END) + X_TOKENS + Y_TOKENS


class ActionTokens(NamedTuple):
    """The four token strings of one re-encoding kind."""

    start: str
    action: str
    end: str
    pad: str


REENCODE_KINDS = ("clip", "dino", "sam")
ACTION_TOKENS: Mapping[str, ActionTokens] = MappingProxyType(
    {
        "clip": ActionTokens(
            "<|clip_action_start|>", "<|clip_action|>", "<|clip_action_end|>", "<|clip_image_pad|>"
        ),
        "dino": ActionTokens(
            "<|detection_action_start|>",
            "<|detection_action|>",
            "<|detection_action_end|>",
            "<|detection_image_pad|>",
        ),
        "sam": ActionTokens(
            "<|seg_action_start|>", "<|seg_action|>", "<|seg_action_end|>", "<|seg_image_pad|>"
        ),
    }
)
# Order in which SeveralKinds lists the kinds it found.
PERCEPTION_KINDS = ("region",) + REENCODE_KINDS

VPT_TOKENS = REGION_TOKENS + tuple(t for k in REENCODE_KINDS for t in ACTION_TOKENS[k])

REGION_TRIGGER = "Identify the region that can help you answer the question, and then answer the question"
REENCODE_TRIGGER = "Require additional perception features, and then answer the question"
SYSTEM_PROMPT = "You are a helpful assistant."

_REQUIRED_QWEN = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- Vocabulary ids --------------------------------------------------------


@dataclass(frozen=True)
class ActionIds:
    """Token ids of one re-encoding kind."""

    start: int
    action: int
    end: int
    pad: int


@dataclass(frozen=True)
class Vocab:
    """Ids of the tokens the VPT flow needs.

    Region fields are None when the tokenizer lacks any region token (a plain
    Qwen2-VL tokenizer); ``actions`` holds only the kinds whose four tokens all
    exist.
    """

    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    region_start: Optional[int]
    region_end: Optional[int]
    x: Optional[tuple[int, ...]]
    y: Optional[tuple[int, ...]]
    actions: Mapping[str, ActionIds] = field(default_factory=dict, hash=False)
    _x_cell: Mapping[int, int] = field(init=False, repr=False, compare=False, hash=False)
    _y_cell: Mapping[int, int] = field(init=False, repr=False, compare=False, hash=False)
    _start_kind: Mapping[int, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        region = (self.region_start, self.region_end, self.x, self.y)
        if any(v is None for v in region) and any(v is not None for v in region):
            raise ValueError("region ids must be all set or all None")
        for name, seq in (("x", self.x), ("y", self.y)):
            if seq is not None and len(seq) != GRID:
                raise ValueError(f"{name} must hold {GRID} ids, got {len(seq)}")
        unknown = set(self.actions) - set(REENCODE_KINDS)
        if unknown:
            raise ValueError(f"unknown re-encoding kinds: {sorted(unknown)}")
        setattr_ = object.__setattr__
        setattr_(self, "actions", MappingProxyType(dict(self.actions)))
        setattr_(self, "_x_cell", MappingProxyType({t: i for i, t in enumerate(self.x or ())}))
        setattr_(self, "_y_cell", MappingProxyType({t: i for i, t in enumerate(self.y or ())}))
        setattr_(self, "_start_kind", MappingProxyType({a.start: k for k, a in self.actions.items()}))

    @classmethod
    def from_token_to_id(cls, lookup: Callable[[str], Optional[int]]) -> "Vocab":
        """Build from ``lookup(token) -> id``, returning None for an absent token."""

        def get(token: str) -> Optional[int]:
            value = lookup(token)
            if value is not None and not _is_int(value):
                raise TypeError(f"lookup({token!r}) returned {value!r}, expected int or None")
            return value

        qwen = [get(t) for t in _REQUIRED_QWEN]
        missing = [t for t, i in zip(_REQUIRED_QWEN, qwen) if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks Qwen2-VL tokens: {missing}")

        region_ids = [get(t) for t in REGION_TOKENS]
        if all(i is not None for i in region_ids):
            region_start, region_end = region_ids[0], region_ids[1]
            x = tuple(region_ids[2 : 2 + GRID])
            y = tuple(region_ids[2 + GRID :])
        else:
            region_start = region_end = x = y = None

        actions = {}
        for kind in REENCODE_KINDS:
            ids = [get(t) for t in ACTION_TOKENS[kind]]
            if all(i is not None for i in ids):
                actions[kind] = ActionIds(*ids)

        return cls(*qwen, region_start, region_end, x, y, actions)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "Vocab":
        """Build from any tokenizer with ``get_vocab()``; a token is present only if listed there."""
        return cls.from_token_to_id(tokenizer.get_vocab().get)

    @property
    def has_region(self) -> bool:
        """Whether the region tokens exist."""
        return self.region_start is not None

    def kind_of_start(self, token_id: int) -> Optional[str]:
        """The re-encoding kind whose ``<|X_action_start|>`` is ``token_id``, else None."""
        return self._start_kind.get(token_id)

    def is_region_token(self, token_id: int) -> bool:
        """Whether ``token_id`` is one of the 18 region tokens."""
        return (
            token_id in self._x_cell
            or token_id in self._y_cell
            or (self.has_region and token_id in (self.region_start, self.region_end))
        )


# --- Parsing round 1 -------------------------------------------------------


@dataclass(frozen=True)
class RegionBlock:
    """One ``<|region_token_start|>(<|x_i|>|<|y_j|>)+<|region_token_end|>`` run.

    ``x_cells``/``y_cells``: the distinct indices named, sorted. ``span``: the
    [start, end) token indices of the whole block, delimiters included.
    """

    x_cells: tuple[int, ...]
    y_cells: tuple[int, ...]
    span: tuple[int, int]

    @property
    def cells(self) -> tuple[int, int, int, int]:
        """(min x, min y, max x, max y); ValueError if x or y cells are missing."""
        if not self.x_cells or not self.y_cells:
            raise ValueError(f"region block at {self.span} lacks x or y cells")
        return (self.x_cells[0], self.y_cells[0], self.x_cells[-1], self.y_cells[-1])


@dataclass(frozen=True)
class RegionRequest:
    """Round 2 shows one crop per block."""

    blocks: tuple[RegionBlock, ...]

    @property
    def kind(self) -> str:
        return "region"


@dataclass(frozen=True)
class ReencodeRequest:
    """Round 2 re-encodes the image with branch ``kind``; ``start_index`` is the
    index of the first ``<|X_action_start|>``."""

    kind: str
    start_index: int


@dataclass(frozen=True)
class SeveralKinds:
    """More than one perception kind: no round 2, the round-1 text is the answer."""

    kinds: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "several"


@dataclass(frozen=True)
class NoPerception:
    """No perception request: the round-1 text is the answer."""

    @property
    def kind(self) -> str:
        return "none"


@dataclass(frozen=True)
class Malformed:
    """A request the published pipeline cannot serve (e.g. a block with no y cell)."""

    reason: str
    detail: object = None

    @property
    def kind(self) -> str:
        return "malformed"


PerceptionResult = Union[RegionRequest, ReencodeRequest, SeveralKinds, NoPerception, Malformed]


def _as_ids(token_ids: Iterable) -> list[int]:
    ids = []
    for pos, value in enumerate(token_ids):
        if isinstance(value, bool):
            raise TypeError(f"token id at index {pos} is a bool ({value!r}), expected int")
        try:
            ids.append(operator.index(value))
        except TypeError:
            raise TypeError(
                f"token id at index {pos} is {type(value).__name__} ({value!r}), expected int"
            ) from None
    return ids


def _region_blocks(ids: list[int], vocab: Vocab) -> list[RegionBlock]:
    if not vocab.has_region:
        return []
    x_cell, y_cell = vocab._x_cell, vocab._y_cell
    blocks = []
    n = len(ids)
    i = 0
    while i < n:
        if ids[i] == vocab.region_start:
            j = i + 1
            while j < n and (ids[j] in x_cell or ids[j] in y_cell):
                j += 1
            if j > i + 1 and j < n and ids[j] == vocab.region_end:
                inner = ids[i + 1 : j]
                blocks.append(
                    RegionBlock(
                        x_cells=tuple(sorted({x_cell[t] for t in inner if t in x_cell})),
                        y_cells=tuple(sorted({y_cell[t] for t in inner if t in y_cell})),
                        span=(i, j + 1),
                    )
                )
                i = j + 1
                continue
        i += 1
    return blocks


def parse_perception(token_ids: Iterable[int], vocab: Vocab) -> PerceptionResult:
    """Classify round-1 generated ids per the reference flow's rules.

    A closing ``<|im_end|>`` may be present or not; it is not a perception token.
    Any int sequence gives a result; a non-int element raises TypeError.
    """
    ids = _as_ids(token_ids)
    blocks = _region_blocks(ids, vocab)

    first_start: dict[str, int] = {}
    for pos, token in enumerate(ids):
        kind = vocab.kind_of_start(token)
        if kind is not None and kind not in first_start:
            first_start[kind] = pos

    kinds = tuple(
        k for k in PERCEPTION_KINDS if (k == "region" and blocks) or k in first_start
    )
    if len(kinds) > 1:
        return SeveralKinds(kinds)
    if not kinds:
        return NoPerception()
    if kinds[0] != "region":
        return ReencodeRequest(kinds[0], first_start[kinds[0]])
    for index, block in enumerate(blocks):
        missing = [a for a, cells in (("x", block.x_cells), ("y", block.y_cells)) if not cells]
        if missing:
            return Malformed(
                f"region block {index} has no {' and no '.join(missing)} cells", block
            )
    return RegionRequest(tuple(blocks))


# --- Region boxes ----------------------------------------------------------


def region_box(
    cells: tuple[int, int, int, int], width: int, height: int, grid: int = GRID
) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of the ORIGINAL image for grid cells (x0, y0, x1, y1).

    The cells are widened by one on each side (clamped to the grid), then
    ``int(c * (size / grid))`` gives the edges, as in the reference flow.
    Only deviation: when an image side is so small (< 4 px) that this gives an
    empty box (where the reference would crop nothing), the box is grown to 1
    pixel on that side, staying inside [0, width] x [0, height].
    """
    if not _is_int(grid) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if not _is_int(width) or not _is_int(height) or width < 1 or height < 1:
        raise ValueError(f"width and height must be positive ints, got {width!r}, {height!r}")
    cells = tuple(cells)
    if (
        len(cells) != 4
        or not all(_is_int(c) and 0 <= c < grid for c in cells)
        or cells[0] > cells[2]
        or cells[1] > cells[3]
    ):
        raise ValueError(
            f"cells must be 4 ints (x0, y0, x1, y1) in [0, {grid - 1}] with x0<=x1, y0<=y1, got {cells!r}"
        )
    cx0, cy0, cx1, cy1 = cells
    cx0, cy0 = max(cx0 - 1, 0), max(cy0 - 1, 0)
    cx1, cy1 = min(cx1 + 1, grid - 1), min(cy1 + 1, grid - 1)
    gw = width / grid
    gh = height / grid
    x0, y0 = int(cx0 * gw), int(cy0 * gh)
    x1, y1 = int((cx1 + 1) * gw), int((cy1 + 1) * gh)
    x0, x1 = _non_empty(x0, x1, width)
    y0, y1 = _non_empty(y0, y1, height)
    return (x0, y0, x1, y1)


def _non_empty(lo: int, hi: int, size: int) -> tuple[int, int]:
    """Grow an empty [lo, hi) to 1 pixel, kept inside [0, size]."""
    if hi > lo:
        return lo, hi
    lo = min(lo, size - 1)
    return lo, lo + 1


def block_box(
    block: RegionBlock, width: int, height: int, grid: int = GRID
) -> tuple[int, int, int, int]:
    """``region_box`` of a parsed block's cells."""
    return region_box(block.cells, width, height, grid)
